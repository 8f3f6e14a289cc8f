"""The typed config schema and the code that composes and checks it."""
