"""The continuous-batching engine on its own: a sequence that joins a running batch gets the tokens it gets
alone (greedy, and sampled with a seed), n samples share one prefill, finished rows free their slots at once."""

import pytest
import torch

from minigpt.core.config import ModelConfig
from minigpt.infer.engine import Engine, Sampling, Sequence, generate_all
from minigpt.infer.generate import generate_ids
from minigpt.nn.model import GPT

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [20, 21, 22, 23], [30, 31]]


@pytest.fixture(scope="module", params=["learned", "rope"])
def model(request):
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=48, vocab_size=97,
                           pos_emb=request.param)).eval()


def test_joining_a_running_batch_gives_the_greedy_tokens_of_decoding_alone(model):
    alone = [generate_ids(model, [p], 16, temperature=0).new_tokens[0] for p in PROMPTS]
    engine = Engine(model, max_batch=2)  # 5 sequences through 2 rows: each joins mid-way through another
    lengths = [16, 5, 11, 16, 3]  # different max_tokens: rows free at different steps
    seqs = generate_all(engine, [Sequence(p, n, Sampling(0)) for p, n in zip(PROMPTS, lengths)])
    assert [s.tokens for s in seqs] == [a[:n] for a, n in zip(alone, lengths)]
    assert all(s.finish_reason == "length" for s in seqs) and not engine.running
    assert engine.steps < sum(lengths)  # steps were shared


def test_a_seeded_sequence_draws_the_same_tokens_whatever_runs_beside_it(model):
    sampling = Sampling(0.9, top_k=20, top_p=0.9)
    alone = generate_all(Engine(model, 1), [Sequence([1, 2, 3], 12, sampling, seed=7)])[0].tokens
    crowd = [Sequence(p, 12, Sampling(1.0) if i % 2 else sampling, seed=i) for i, p in enumerate(PROMPTS)]
    crowd[2] = Sequence([1, 2, 3], 12, sampling, seed=7)
    generate_all(Engine(model, 4), crowd)
    assert crowd[2].tokens == alone
    assert len({tuple(s.tokens) for s in crowd}) > 1


def test_n_samples_share_one_prefill_and_sample_i_uses_seed_plus_i(model):
    engine = Engine(model, 4)
    prompt = [5, 6, 7]
    group = [Sequence(prompt, 10, Sampling(1.0), seed=100) for _ in range(3)]
    engine.add(group)
    assert engine.prefills == 1 and len(engine.running) == 3
    while engine.running:
        engine.step()
    for i, s in enumerate(group):
        alone = generate_all(Engine(model, 1), [Sequence(prompt, 10, Sampling(1.0), seed=100 + i)])[0]
        assert s.tokens == alone.tokens


def test_stop_tokens_and_finish_free_rows_and_the_others_go_on(model):
    greedy = generate_ids(model, [PROMPTS[0]], 10, temperature=0).new_tokens[0]
    engine = Engine(model, 3)
    stopper = Sequence(PROMPTS[0], 10, Sampling(0), stop_ids=frozenset([greedy[3]]))
    quitter, stayer = Sequence(PROMPTS[1], 10, Sampling(0)), Sequence(PROMPTS[3], 10, Sampling(0))
    for s in (stopper, quitter, stayer):
        engine.add([s])
    engine.step()
    engine.finish(quitter, "cancelled")  # a client gone: its row frees now, the last row moves into it
    assert quitter not in engine.running and stayer in engine.running and engine.free == 3 - len(engine.running)
    while engine.running:
        engine.step()
    first = greedy.index(greedy[3])
    assert stopper.finish_reason == "stop" and stopper.tokens == greedy[:first]
    assert quitter.finish_reason == "cancelled" and len(quitter.tokens) == 2
    assert stayer.tokens == generate_ids(model, [PROMPTS[3]], 10, temperature=0).new_tokens[0]


def test_a_sequence_ends_at_the_context_and_prompts_outside_it_are_refused(model):
    from minigpt.core.errors import UserError

    engine = Engine(model, 2)
    s = generate_all(engine, [Sequence(list(range(1, 41)), 100, Sampling(0))])[0]
    assert s.finish_reason == "length" and len(s.prompt) + len(s.tokens) == model.config.block_size
    with pytest.raises(UserError, match="1 to 47"):
        engine.add([Sequence(list(range(48)), 4)])
    assert not engine.running


def test_generate_prefills_a_repeated_prompt_once_and_every_sample_decodes_as_alone(model, monkeypatch):
    """`minigpt generate --num-samples` repeats each prompt: the static batch prefills each distinct prompt once and
    copies its cache row; greedy samples equal decoding alone."""
    from minigpt.infer import generate

    rows, real = [], generate._prefill_rows
    monkeypatch.setattr(generate, "_prefill_rows", lambda m, idx, *a: (rows.append(idx.size(0)), real(m, idx, *a))[1])
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    g = generate_ids(model, prompts, 8, temperature=0)
    assert rows == [2]
    monkeypatch.setattr(generate, "_prefill_rows", real)
    assert g.new_tokens == [generate_ids(model, [p], 8, temperature=0).new_tokens[0] for p in prompts]


def sharp(seed: int, n_layer: int, pos_emb: str) -> GPT:
    """A random model with decided opinions (weights scaled up: the plain init repeats one token, so any draft agrees)."""
    torch.manual_seed(seed)
    m = GPT(ModelConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=48, vocab_size=32, pad_vocab_multiple=1,
                        pos_emb=pos_emb))
    with torch.no_grad():
        for w in m.parameters():
            if w.dim() == 2:
                w.mul_(25)
    return m.eval()


def test_speculative_rows_of_a_batch_give_the_targets_greedy_tokens_and_seeded_draws_ignore_neighbours(model):
    """A draft (another random model: many rejections) and the target speculate for several rows at once, rows joining
    mid-way and accepting different counts: greedy tokens equal the target's own; a seeded sampled row draws the same
    tokens beside others as alone."""
    target, draft = sharp(0, 2, model.config.pos_emb), sharp(1, 1, model.config.pos_emb)
    prompts = [[t % 32 for t in p] for p in PROMPTS]
    alone = [generate_ids(target, [p], 14, temperature=0).new_tokens[0] for p in prompts]
    engine = Engine(target, max_batch=3, draft=draft, k=3)
    seqs = generate_all(engine, [Sequence(p, 14, Sampling(0)) for p in prompts])
    assert [s.tokens for s in seqs] == alone
    assert engine.accepted < engine.drafted and engine.steps < 14 * len(prompts)  # rejections, repaired; shared steps
    self_draft = Engine(target, max_batch=3, draft=target, k=3)  # a draft equal to the target is always right
    assert [s.tokens for s in generate_all(self_draft, [Sequence(p, 14, Sampling(0)) for p in prompts])] == alone
    assert self_draft.accepted == self_draft.drafted
    sampling = Sampling(0.9, top_p=0.9)
    one = generate_all(Engine(target, 1, draft=draft, k=3), [Sequence([1, 2, 3], 10, sampling, seed=3)])[0]
    crowd = [Sequence(p, 10, sampling, seed=i) for i, p in enumerate(prompts)]
    crowd[1] = Sequence([1, 2, 3], 10, sampling, seed=3)
    generate_all(Engine(target, 4, draft=draft, k=3), crowd)
    assert crowd[1].tokens == one.tokens
