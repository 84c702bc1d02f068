"""Text in and out: the tokenizer (vocab, SentencePiece and BPE), the chat templates, and the
streaming output (UTF-8 pieces, stop strings, the reasoning/answer split)."""
