"""Tandem router: OpenAI-compatible gateway, tokenization, detokenization, placement."""
