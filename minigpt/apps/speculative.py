"""Speculative decoding beside plain decoding of the same target, prompt by prompt: the text is the
speculative output, the speed-up is measured against the target alone with the same settings, just
before (what `minigpt generate --draft` prints)."""

from __future__ import annotations

from typing import Iterator

from minigpt.infer.generate import generate_ids
from minigpt.infer.speculative import check_pair, speculative_generate
from minigpt.run.load import load_run


def compare_speculative(target, tokenizer, cfg, device, draft_dir: str, prompts: list[str], k: int,
                        max_new_tokens: int, sampling: dict) -> Iterator[dict]:
    """One record per prompt: the text, the acceptance statistics, plain and speculative tokens/s."""
    draft, draft_tok, _, draft_step = load_run(draft_dir, device)
    check_pair(target, draft, tokenizer.get_vocab(), draft_tok.get_vocab())
    eot = tokenizer.token_to_id(cfg.sample.stop_token)
    warm = tokenizer.encode(cfg.sample.prompt).ids or [0]
    generate_ids(target, [warm], 4, **sampling)  # warm-up, both ways
    speculative_generate(target, draft, warm, 4, k=k, **sampling)
    for prompt in prompts:
        ids = tokenizer.encode(prompt).ids
        plain = generate_ids(target, [ids], max_new_tokens, eot_id=None, **sampling)
        spec = speculative_generate(target, draft, ids, max_new_tokens, k=k, eot_id=None, **sampling)
        tokens = spec.new_tokens[: spec.new_tokens.index(eot)] if eot in spec.new_tokens else spec.new_tokens
        plain_s = plain.prefill_s + plain.decode_s
        speedup = plain_s / spec.seconds if spec.seconds > 0 else None
        yield {"prompt": prompt, "text": prompt + tokenizer.decode(tokens), "draft_step": draft_step, **spec.stats(),
               "plain_tokens_per_s": round(len(plain.new_tokens[0]) / plain_s, 1),
               "speedup": round(speedup, 3) if speedup else None}
