"""Write the built-in `tiny` preset into rlhf_cli/models/tiny/: tokenizer, chat template, model config.

The tokenizer is byte-level with no merges: every UTF-8 byte is one token, so any text encodes,
digits are always single tokens (which small models need to learn arithmetic), and nothing has to
be trained. Four special tokens: `<|pad|>` (distinct from EOS, so EOS is never masked as padding),
`<|im_start|>`, `<|im_end|>` (end of turn, and the EOS) and `<|endoftext|>`.

The chat template is ChatML without a newline after `<|im_end|>`, so the end-of-turn token is the
last token of an assistant turn. The model is a 4-layer Llama of about 1M parameters (hidden 128):
measured on a 2-core CPU it learns the built-in arithmetic task to about 50% in two minutes.
Weights are not shipped; `model.path=tiny` initialises them from `train.seed`.

Run: python scripts/make_tiny_model.py
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parent.parent / "rlhf_cli" / "models" / "tiny"
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which ByteLevel uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def main() -> None:
    byte_chars = bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({byte_chars[b]: len(SPECIAL) + b for b in range(256)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL)

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        model_max_length=512,
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    OUT.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(OUT)

    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=hf_tokenizer.pad_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config.save_pretrained(OUT)
    print(f"wrote {OUT} (vocab {len(vocab)})")


if __name__ == "__main__":
    main()
