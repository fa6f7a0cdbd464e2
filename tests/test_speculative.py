"""Speculative decoding: exact for greedy decoding, and the target's distribution when sampling."""

import json

import pytest
import torch
from conftest import run_cli

from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError
from minigpt.infer.generate import generate_ids
from minigpt.infer.sampler import filtered_probs
from minigpt.infer.speculative import check_pair, speculative_generate
from minigpt.nn.model import GPT


def sharp_model(seed: int, n_layer: int, vocab: int = 8, block: int = 24) -> GPT:
    """A random model with decided opinions: GPT-2's init scaled up, so its distributions are far
    from uniform and two seeds disagree (the plain init repeats one token, and any draft agrees)."""
    torch.manual_seed(seed)
    m = GPT(ModelConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=block, vocab_size=vocab, pad_vocab_multiple=1))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(25)
    return m.eval()


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("prompt", [[1], [1, 2, 3, 4]])
def test_greedy_speculative_output_is_the_targets_greedy_output(k, prompt):
    target, draft = sharp_model(0, 2, vocab=32), sharp_model(1, 1, vocab=32)
    plain = generate_ids(target, [prompt], 18, temperature=0).new_tokens[0]
    spec = speculative_generate(target, draft, prompt, 18, k=k, temperature=0)
    assert spec.new_tokens == plain
    s = spec.stats()
    assert s["drafted"] > 0 and s["acceptance_rate"] < 1  # rejections happened and were repaired
    assert s["tokens_per_target_forward"] >= 1
    # a draft that is the target itself is always right: K + 1 tokens per target forward
    same = speculative_generate(target, target, prompt, 18, k=k, temperature=0)
    assert same.new_tokens == plain and same.stats()["acceptance_rate"] == 1.0


def test_sampled_tokens_follow_the_targets_distribution_not_the_drafts():
    """The first two tokens after a prompt, over 600 seeds (K = 2: a rejection, or acceptance
    followed by the next token): chi-square against the target's exact pair probabilities is
    small, against the draft's huge."""
    target, draft = sharp_model(0, 2), sharp_model(1, 1)
    with torch.no_grad():
        def pair_probs(m):
            first = filtered_probs(m(torch.tensor([[1]])).logits[0, -1], 1.0)
            return torch.stack([first[a] * filtered_probs(m(torch.tensor([[1, a]])).logits[0, -1], 1.0)
                                for a in range(8)])
        p_target, p_draft = pair_probs(target), pair_probs(draft)
    n, counts = 600, torch.zeros(8, 8)
    for seed in range(n):
        a, b = speculative_generate(target, draft, [1], 2, k=2, temperature=1.0, seed=seed).new_tokens
        counts[a, b] += 1

    def chi_square(p):
        expected = p.flatten() * n
        big = expected >= 5  # cells expected fewer than 5 times are pooled into one
        e = torch.cat([expected[big], expected[~big].sum().view(1)])
        o = torch.cat([counts.flatten()[big], counts.flatten()[~big].sum().view(1)])
        keep = e > 0
        return float(((o - e) ** 2 / e)[keep].sum()), int(keep.sum()) - 1

    stat, df = chi_square(p_target)
    assert stat < df + 5 * (2 * df) ** 0.5, (stat, df)  # far inside; a 5-sigma bound
    wrong, _ = chi_square(p_draft)
    assert wrong > 50 * (df + 5 * (2 * df) ** 0.5)


def test_models_with_other_tokenizers_are_refused():
    a, b = sharp_model(0, 1), sharp_model(1, 1, vocab=9)
    with pytest.raises(UserError, match="the draft's vocab_size 9 differs from the target's 8"):
        check_pair(a, b, {}, {})
    with pytest.raises(UserError, match="the draft's tokenizer differs from the target's"):
        check_pair(a, a, {"x": 1}, {"y": 1})


def test_generate_with_a_draft_run(tiny_cfg, tmp_path):
    from minigpt.train.loop import train

    target = train(tiny_cfg(**{"train.max_steps": 3, "train.out_dir": f'"{tmp_path / "target"}"'}), log=lambda *a: None)
    draft = train(tiny_cfg(**{"train.max_steps": 3, "model.n_layer": 1, "train.out_dir": f'"{tmp_path / "draft"}"'}),
                  log=lambda *a: None)
    common = ["--prompt", "def", "--temperature", "0", "--max-new-tokens", "12"]
    plain = run_cli("generate", "--run", target["run_dir"], *common)
    spec = run_cli("generate", "--run", target["run_dir"], "--draft", draft["run_dir"], "--speculate", "3", *common)
    assert spec.returncode == 0, spec.stderr
    spec_text = spec.stdout.split("===\n", 1)[1].rsplit("\n", 2)[0]  # between the header and the JSON line
    assert spec_text + "\n" == plain.stdout  # greedy: the target's own text
    stats = json.loads(spec.stdout.strip().splitlines()[-1])
    assert stats["event"] == "speculative" and stats["k"] == 3 and stats["speedup"] > 0
    assert "acceptance" in spec.stderr and "speed-up" in spec.stderr
    other = train(tiny_cfg(**{"train.max_steps": 1, "model.vocab_size": 300, "train.out_dir": f'"{tmp_path / "other"}"'}),
                  log=lambda *a: None)
    r = run_cli("generate", "--run", target["run_dir"], "--draft", other["run_dir"], *common)
    assert r.returncode == 2 and "vocab_size 300 differs from the target's 320" in r.stderr
