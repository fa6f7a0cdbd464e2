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
