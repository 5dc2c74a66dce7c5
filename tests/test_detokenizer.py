"""Incremental detokenization options that change the text, checked on a real tokenizer."""

from __future__ import annotations

from zllm.frontend.detokenizer import IncrementalDetokenizer


def test_spaces_between_special_tokens(embedding_model_path: str) -> None:
    """BERT's WordPiece decoder puts a space before every token; with the option off, an
    added token right after another one comes without it (vLLM's rule)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedding_model_path)
    prompt = tok("Hello")["input_ids"][:-1]
    word = tok("world")["input_ids"][1:-1]
    ids = [tok.cls_token_id, tok.sep_token_id, *word, tok.sep_token_id, tok.sep_token_id]

    def text(spaces: bool, skip: bool = False) -> str:
        detok = IncrementalDetokenizer(tok, prompt, skip, spaces)
        return "".join(detok.step(t) for t in ids)

    assert text(True) == " [CLS] [SEP] world [SEP] [SEP]"
    assert text(False) == " [CLS][SEP] world [SEP][SEP]"
    assert text(False, skip=True) == text(True, skip=True) == " world"
