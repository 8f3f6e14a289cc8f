# Packaged as `rlhf_cli.conf` so that Hydra finds these YAML files as `pkg://rlhf_cli.conf`.
