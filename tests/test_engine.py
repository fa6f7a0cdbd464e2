"""The continuous-batching engine on its own: a sequence that joins a running batch gets the tokens it gets
alone (greedy, and sampled with a seed), n samples share one prefill, finished rows free their slots at once."""

import pytest
import torch

from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError
from minigpt.infer.engine import Engine, Sampling, Sequence, SpeculativeEngine, generate_all
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
    assert quitter.finish_reason == "cancelled" and len(quitter.tokens) == 1  # the step that prefilled it drew one
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
    engine = SpeculativeEngine(target, 3, draft, k=3)
    seqs = generate_all(engine, [Sequence(p, 14, Sampling(0)) for p in prompts])
    assert [s.tokens for s in seqs] == alone
    assert engine.accepted < engine.drafted and engine.steps < 14 * len(prompts)  # rejections, repaired; shared steps
    self_draft = SpeculativeEngine(target, 3, target, k=3)  # a draft equal to the target is always right
    assert [s.tokens for s in generate_all(self_draft, [Sequence(p, 14, Sampling(0)) for p in prompts])] == alone
    assert self_draft.accepted == self_draft.drafted
    sampling = Sampling(0.9, top_p=0.9)
    one = generate_all(SpeculativeEngine(target, 1, draft, k=3), [Sequence([1, 2, 3], 10, sampling, seed=3)])[0]
    crowd = [Sequence(p, 10, sampling, seed=i) for i, p in enumerate(prompts)]
    crowd[1] = Sequence([1, 2, 3], 10, sampling, seed=3)
    generate_all(SpeculativeEngine(target, 4, draft, k=3), crowd)
    assert crowd[1].tokens == one.tokens


def test_a_long_prompt_prefills_in_chunks_beside_the_decodes_and_gives_the_tokens_of_decoding_alone(model):
    """prefill_chunk 4: a 30-token newcomer takes 8 steps to prefill, and the running row gains a token in each of
    them (it is not stalled); both give the greedy tokens of decoding alone."""
    long_prompt = list(range(40, 70))
    alone = {tuple(p): generate_ids(model, [p], 10, temperature=0).new_tokens[0] for p in (PROMPTS[1], long_prompt)}
    engine = Engine(model, max_batch=2, prefill_chunk=4)
    first, second = Sequence(PROMPTS[1], 10, Sampling(0)), Sequence(long_prompt, 10, Sampling(0))
    engine.add([first])
    while not first.tokens:  # 7 prompt tokens: two steps
        engine.step()
    engine.add([second])
    gained = []
    while not second.tokens:
        before = len(first.tokens)
        engine.step()
        gained.append(len(first.tokens) - before)
    assert len(gained) == 8 and gained == [1] * 8  # ceil(30 / 4) steps, a decode in every one
    while engine.running:
        engine.step()
    assert first.tokens == alone[tuple(PROMPTS[1])] and second.tokens == alone[tuple(long_prompt)]


def _fill(model, cache, table: list[int], ids: list[int], first: int = 0) -> None:
    """Prefill ids into a row of a paged cache whose blocks are table, from slot first on."""
    from minigpt.nn.ragged import make_ragged

    batch = make_ragged([], [(table, first, len(ids))], [len(ids) - 1], "cpu")
    model(torch.tensor([ids]), input_pos=batch, positions=batch.positions.unsqueeze(0), cache=cache)


def test_the_flat_batch_of_decodes_and_chunks_gives_each_rows_own_logits(model):
    """One ragged forward over a paged cache (two decoding rows, one prompt chunk starting mid-prompt; each row's blocks
    scattered through the pool, out of order) equals running each row alone."""
    from minigpt.nn.ragged import make_ragged

    prompts = [list(range(1, 21)), list(range(20, 50)), list(range(50, 90))]
    cache, tables = model.make_paged_cache(12), [[5, 0], [3, 9], [11, 1, 7]]
    for table, p in zip(tables[:2], prompts[:2]):  # rows 0 and 1 hold their prompts but the last token
        _fill(model, cache, table, p[:-1])
    _fill(model, cache, tables[2], prompts[2][:18])  # row 2: 18 of 40
    batch = make_ragged([(tables[0], 19), (tables[1], 29)], [(tables[2], 18, 22)], [0, 1, 23], "cpu")
    ids = torch.tensor([[prompts[0][-1], prompts[1][-1]] + prompts[2][18:]])
    flat = model(ids, input_pos=batch, positions=batch.positions.unsqueeze(0), cache=cache).logits[0]
    for i, p in enumerate(prompts):
        ref = model(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(flat[i], ref, atol=1e-5, rtol=1e-4)


def test_decode_rows_of_like_length_share_a_call_and_each_gets_its_own_logits(model):
    """Continuous batching puts new rows beside rows far on: the decodes are split into calls of rows of like length
    (nn/ragged.group_decodes: the split that reads the fewest row-slots, a call counted as CALL_SLOTS), each call
    gathering its rows' blocks to its longest row's, each row's logits its own."""
    from minigpt.nn.ragged import BLOCK, CALL_SLOTS, group_decodes, make_ragged

    assert group_decodes([2, 3]) == [[0, 1]]  # alike: one call
    assert group_decodes([19, 1, 1, 2, 1, 1]) == [[1, 2, 4, 5, 3], [0]]  # one far longer: alone
    assert group_decodes([1, 19, 2, 18]) == [[0, 2], [3, 1]] and 4 * 19 * BLOCK > 2 * 2 * BLOCK + 2 * 19 * BLOCK + CALL_SLOTS
    many = [1] * 30 + [8] * 30  # two kinds: two calls
    assert sorted(map(len, group_decodes(many))) == [30, 30]
    prompts = [[(3 * i) % 90 + 1 for i in range(44)], [5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16], [20, 21, 22, 23]]
    cache, tables = model.make_paged_cache(8), [[2, 6, 4], [0], [7], [3]]
    for table, p in zip(tables, prompts):  # each row holds its prompt but the last token
        _fill(model, cache, table, p[:-1])
    batch = make_ragged([(t, len(p) - 1) for t, p in zip(tables, prompts)], [], [0, 1, 2, 3], "cpu")
    assert [g[0].tolist() for g in batch.groups] == [[1, 2, 3], [0]] and batch.groups[0][2].size(-1) == BLOCK
    flat = model(torch.tensor([[p[-1] for p in prompts]]), input_pos=batch, positions=batch.positions.unsqueeze(0),
                 cache=cache).logits[0]
    for i, p in enumerate(prompts):
        torch.testing.assert_close(flat[i], model(torch.tensor([p])).logits[0, -1], atol=1e-5, rtol=1e-4)


def test_the_prefix_cache_copies_shared_blocks_instead_of_computing_them(model):
    """Prompts sharing 32 tokens: the later ones find two 16-token blocks (the hit counted), compute only the rest,
    and still give the greedy tokens of decoding alone; an unrelated prompt finds nothing."""
    shared = [(7 * i) % 90 + 1 for i in range(32)]
    prompts = [shared + [3, 4], shared + [5], shared[:20] + [9, 9], [60, 61, 62]]
    alone = [generate_ids(model, [p], 6, temperature=0).new_tokens[0] for p in prompts]
    engine = Engine(model, max_batch=1, prefill_chunk=8)
    steps = []
    for p in prompts:
        before = engine.steps
        s = generate_all(engine, [Sequence(p, 6, Sampling(0))])[0]
        steps.append(engine.steps - before)
        assert s.tokens == alone[prompts.index(p)]
    st = engine.prefix.stats()
    assert st["lookups"] == 4 and st["hits"] == 2 and st["hit_tokens"] == 32 + 16
    assert st["hit_rate"] == round(48 / sum(len(p) for p in prompts), 4)
    assert steps[1] < steps[0]  # 34 prompt tokens in 5 chunks of 8, then 1 token: one chunk


def test_a_group_prefilling_in_chunks_goes_on_when_its_first_sample_is_cancelled(model):
    prompt = list(range(1, 21))
    alone = generate_ids(model, [prompt], 5, temperature=0).new_tokens[0]
    engine = Engine(model, 3, prefill_chunk=6)
    group = [Sequence(prompt, 5, Sampling(0)) for _ in range(3)]
    engine.add(group)
    engine.step()  # 6 of 20 prompt tokens in group[0]'s row
    engine.finish(group[0], "cancelled")
    while engine.running:
        engine.step()
    assert group[0].tokens == [] and group[1].tokens == alone and group[2].tokens == alone


def test_a_server_model_with_packed_linears_gives_the_greedy_tokens_of_the_dense_model(model):
    """serve packs the blocks' Linears for oneDNN (nn/torch_private.prepack_linears): the same tokens as the dense
    model decoding alone."""
    import copy

    from minigpt.nn.torch_private import prepack_linears

    packed = copy.deepcopy(model)
    assert prepack_linears(packed) > 0  # the pinned torch's CPU build has oneDNN
    assert not any(type(m) is torch.nn.Linear for m in packed.blocks.modules()) and packed.lm_head.packed is not None
    ids = torch.tensor([PROMPTS[0] * 2])
    with torch.no_grad():  # 2+ rows take the packed kernels, the head's too: the dense model's logits to rounding
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    alone = [generate_ids(model, [p], 12, temperature=0).new_tokens[0] for p in PROMPTS]
    seqs = generate_all(Engine(packed, 3), [Sequence(p, 12, Sampling(0)) for p in PROMPTS])
    assert [s.tokens for s in seqs] == alone


def test_prompts_admitted_together_share_the_prefix_the_first_of_them_prefills(model):
    """Three prompts with one 40-token prefix, admitted at once, prefilled 16 tokens a step: the first computes the
    prefix; the others ask the prefix cache when their first chunk comes and find its first two blocks (kept as its
    chunks end), and all give the greedy tokens of decoding alone."""
    shared = [(5 * i) % 90 + 1 for i in range(40)]
    prompts = [shared + [3, 4], shared + [6], shared + [7, 8, 9]]
    alone = [generate_ids(model, [p], 5, temperature=0).new_tokens[0] for p in prompts]
    engine = Engine(model, max_batch=3, prefill_chunk=16)
    seqs = [Sequence(p, 5, Sampling(0)) for p in prompts]
    for s in seqs:
        engine.add([s])
    while engine.running:
        engine.step()
    assert [s.tokens for s in seqs] == alone
    st = engine.prefix.stats()
    assert st["lookups"] == 3 and st["hits"] == 2 and st["hit_tokens"] >= 2 * 32


def test_edge_cases_of_chunks_and_the_prefix_cache_give_the_tokens_of_decoding_alone(model):
    """A prompt one short of the context (one token, then the end), a prompt that is a cached prompt again (found but
    its last token computed), a seeded group of three behind a prefix hit, and a lone prompt cancelled mid-prefill:
    every other sequence still gets the tokens it gets alone."""
    edge = list(range(1, 48))  # 47 tokens: the context is 48
    again = [(3 * i) % 90 + 1 for i in range(32)]  # exactly two blocks
    engine = Engine(model, max_batch=6, prefill_chunk=5)
    first = generate_all(engine, [Sequence(again, 4, Sampling(0))])[0]
    seqs = [Sequence(edge, 5, Sampling(0)), Sequence(again, 4, Sampling(0))]
    group = [Sequence(again + [7], 6, Sampling(1.0), seed=11) for _ in range(3)]
    lone = Sequence(list(range(60, 90)), 4, Sampling(0))
    for s in seqs + [lone]:
        engine.add([s])
    engine.add(group)
    engine.step()
    engine.finish(lone, "cancelled")  # mid-prefill: 5 of its 30 tokens or none yet
    while engine.running:
        engine.step()
    assert seqs[0].tokens == generate_ids(model, [edge], 1, temperature=0).new_tokens[0]
    assert seqs[0].finish_reason == "length" and len(seqs[0].tokens) == 1
    assert seqs[1].tokens == first.tokens == generate_ids(model, [again], 4, temperature=0).new_tokens[0]
    for i, s in enumerate(group):
        assert s.tokens == generate_all(Engine(model, 1), [Sequence(again + [7], 6, Sampling(1.0), seed=11 + i)])[0].tokens
    assert lone.finish_reason == "cancelled" and not engine._unlooked and not engine._filling
    # `again` again: its two blocks found, the first shared and the last computed again (its last token's logits give
    # the first new token, and a row never writes into a shared block): 16; the group: two blocks, one lookup for its
    # three samples
    assert engine.prefix.stats()["hit_tokens"] == 16 + 32


def test_the_paged_cache_runs_more_sequences_than_whole_contexts_and_preempts_when_full(model):
    """A cache of two contexts' tokens (96) holds six short sequences at once; one of 48 (a context) holds three rows
    only while they fit: the newest is preempted (its blocks released) and started again later, and every sequence
    still gets the tokens it gets alone, greedy or seeded. Every block is released at the end."""
    short = [Sequence(p, 6, Sampling(0)) for p in PROMPTS + [[40, 41]]]
    engine = Engine(model, max_batch=6, kv_tokens=96)
    for s in short:
        assert engine.fits(1, len(s.prompt))
        engine.add([s])
    engine.step()
    assert len(engine.running) == 6 and engine.kv_tokens == 96
    while engine.running:
        engine.step()
    assert engine.preemptions == 0 and [s.tokens for s in short] == [
        generate_ids(model, [s.prompt], 6, temperature=0).new_tokens[0] for s in short]
    long = [list(range(1 + i, 15 + i)) for i in range(3)]  # 14 + 20 tokens each: three need 9 blocks, the pool has 3
    seqs = [Sequence(p, 20, Sampling(0)) for p in long] + [Sequence(long[0], 20, Sampling(0.9, top_k=20), seed=5)]
    engine = Engine(model, max_batch=3, kv_tokens=48, prefill_chunk=8)
    generate_all(engine, seqs)
    assert engine.preemptions > 0 and engine.blocks.available == engine.blocks.n_blocks == 3
    assert [s.tokens for s in seqs[:3]] == [generate_ids(model, [p], 20, temperature=0).new_tokens[0] for p in long]
    assert seqs[3].tokens == generate_all(Engine(model, 1), [Sequence(long[0], 20, Sampling(0.9, top_k=20), seed=5)])[0].tokens
    with pytest.raises(UserError, match="less than one context"):
        Engine(model, 2, kv_tokens=30)  # two blocks: 32 slots


def test_the_block_pool_shares_counts_and_evicts_cached_prefixes_least_recently_released_first():
    from minigpt.infer.blocks import BlockPool
    from minigpt.nn.ragged import BLOCK

    pool = BlockPool(3)
    a, b = pool.take(), pool.take()
    pool.name(list(range(2 * BLOCK)), [a, b])  # a prompt's two full blocks, named
    pool.share(a)  # a second row shares the first
    pool.release([a, b])  # the first row leaves: a still used, b cached
    assert pool.refs[a] == 1 and pool.available == 2
    assert pool.lookup(list(range(2 * BLOCK)) + [7]) == ([a, b], 2 * BLOCK)  # both found (the caller shares them)
    c = pool.take()  # the free one first
    assert c not in (a, b) and pool.take() == b  # then the cached one, its name forgotten
    assert pool.lookup(list(range(2 * BLOCK)) + [7]) == ([a], BLOCK)
    assert pool.take() is None
    assert BlockPool(2, prefix_cache=False).lookup(list(range(40))) == ([], 0)
