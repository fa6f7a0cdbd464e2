"""A minigpt run as an lm-evaluation-harness model (the `lm-eval` package, the `eval` extra).

    minigpt eval --run RUN --tasks hellaswag,arc_easy [--include-path DIR] [--output DIR]
    python -m minigpt.infer.harness --model minigpt --model_args run=RUN --tasks ...   (lm-eval's own CLI)

`MinigptLM` implements the three request types the harness sends, in the way its `hf` model does, so the
scores of a run equal those of the same run exported with `minigpt convert --to-hf` and scored by the `hf`
model (a test checks the per-example log-likelihoods):
  loglikelihood          context + continuation, truncated from the left to block_size + 1 tokens; the
                         continuation's summed log-probability and whether greedy decoding would produce it
  loglikelihood_rolling  a whole text in disjoint windows of block_size tokens, each scored with the longest
                         history the window allows (lm-eval's get_rolling_token_windows), the first after the
                         prefix token (end-of-text, as the exported model's BOS)
  generate_until         greedy or sampled decoding on the static KV cache, cut at the first stop string
Batches are padded on the right (causal attention: padding never changes an earlier position).
"""

from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401  (registers lm-eval's own models beside ours: hf, local-completions, ...)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from minigpt.core.device import resolve_device
from minigpt.data.tokenizer import EOT
from minigpt.infer.evaluate import row_logprobs
from minigpt.infer.generate import generate_ids
from minigpt.run.load import load_run


@register_model("minigpt")
class MinigptLM(TemplateLM):
    def __init__(self, run: str, device: str = "cpu", batch_size: int | str = 16, **kwargs) -> None:
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's own CLI asks for cuda:0 unless told: on a machine without CUDA that means the CPU
            logging.getLogger(__name__).warning("device %s asked for, but CUDA is not available: running on cpu", device)
            device = "cpu"
        self._device = resolve_device(str(device))
        self.model, self.tokenizer, self.cfg, self.step = load_run(run, self._device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = self.model.config.block_size

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.token_to_id(EOT) if self.tokenizer.token_to_id(EOT) is not None else 0

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for i in range(0, len(requests), self.batch_size):
            out += self._score_batch([(ctx, cont) for _, ctx, cont in requests[i:i + self.batch_size]])
        return out

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        whole = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in pairs]
        scored = row_logprobs(self.model, [w[:-1] for w in whole], [w[1:] for w in whole])
        return [(s.logprobs[-len(cont):].sum().item(), bool(s.greedy[-len(cont):].all()))
                for s, (_, cont) in zip(scored, pairs)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, kw in [r.args for r in requests]:
            until = kw.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else until
            ids = self.tok_encode(context)[-(self.max_length - 1):] or [self.eot_token_id]
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            gen = generate_ids(self.model, [ids], int(kw.get("max_gen_toks", 256)), temperature=temperature,
                               eot_id=self.eot_token_id)
            text = self.tok_decode(gen.new_tokens[0])
            cut = min([text.index(s) for s in until if s and s in text] or [len(text)])
            out.append(text[:cut])
        return out


def evaluate_tasks(run: str, tasks: list[str], include_path: str | None = None, device: str = "cpu",
                   batch_size: int = 16, limit: int | None = None, output: str | None = None) -> dict:
    """lm-eval's simple_evaluate on a run: its results dict (also saved under `output` as lm-eval saves them)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from minigpt.core.errors import UserError

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # not all yours: index lm-eval's own too
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise UserError(f"--tasks: no lm-eval task named {', '.join(missing)}; list them with 'lm-eval ls tasks', or "
                        f"give --include-path DIR with your own YAML")
    model = MinigptLM(run, device=device, batch_size=batch_size)
    results = simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit, log_samples=output is not None)
    if output:
        tracker = EvaluationTracker(output_path=output)
        tracker.save_results_aggregated(results=results, samples=results.get("samples"))
    return results


def main() -> None:
    """lm-eval's own CLI (`python -m minigpt.infer.harness ...`), with the minigpt model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
