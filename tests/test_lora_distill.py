"""LoRA (nn/lora.py) and distillation (train/distill.py): what trains, what is saved, what readers see,
memory measured against the formulas, and the bad combinations refused before work starts."""

import copy
import json

import pytest
import torch
from conftest import REPO, run_cli, set_args, tiny_overrides

from minigpt.core.config import ModelConfig, load_config
from minigpt.core.errors import UserError
from minigpt.nn.lora import LoRALinear, apply_lora, lora_memory, merge_lora
from minigpt.nn.model import GPT
from minigpt.nn.optim import make_optimizer
from minigpt.run.load import load_run

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=256)


def test_lora_starts_at_the_base_and_merges_to_the_same_logits():
    torch.manual_seed(0)
    base = GPT(CFG).eval()
    model = copy.deepcopy(base)
    n = apply_lora(model, rank=4, alpha=8, targets=("c_attn", "c_proj", "c_fc"))
    assert n == 2 * (4 * (64 + 192) + 4 * (64 + 64) + 4 * (64 + 256) + 4 * (256 + 64))  # A (r x in) + B (out x r)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, base(x).logits)  # B = 0: the base model exactly
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
        adapted = model(x).logits
        merged = merge_lora(copy.deepcopy(model))(x).logits
    assert not any(isinstance(m, LoRALinear) for m in merge_lora(copy.deepcopy(model)).modules())
    assert (adapted - base(x).logits).abs().max() > 1e-3 and torch.allclose(merged, adapted, atol=1e-5)


def test_only_adapters_train_and_the_model_states_match_the_formula():
    torch.manual_seed(0)
    model = GPT(CFG)
    cfg = load_config(REPO / "configs" / "tiny.toml", ["train.lr=1e-3"])
    full = copy.deepcopy(model)
    trainable = apply_lora(model, rank=4, alpha=8)
    for net in (model, full):
        opt = make_optimizer(net, cfg.train, fused=False)
        x = torch.randint(0, 256, (2, 16))
        net(x, x).loss.backward()
        opt.step()
        mem = lora_memory(net, opt)
        key = "lora" if net is model else "full_finetune"
        assert mem["measured_bytes"]["total"] == mem["formula_bytes"][key]
    assert lora_memory(model)["trainable_params"] == trainable
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.fixture(scope="module")
def lora_run(good_run, corpus_dir, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    sets = tiny_overrides(corpus_dir, data_cache, out, **{"train.max_steps": 4, "train.lr": 3e-2})
    sets += [f'train.init_from="{good_run}"', "train.lora_rank=4", "train.lora_alpha=8.0"]
    r = run_cli("train", "--config", str(REPO / "configs" / "tiny.toml"), *set_args(sets))
    assert r.returncode == 0, r.stderr
    return out


def test_a_lora_run_saves_adapters_only_and_readers_get_the_merged_model(lora_run, good_run):
    from safetensors.torch import load_file

    saved = load_file(str(next((lora_run / "checkpoints").glob("step_*")) / "model.safetensors"))
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    model, _, cfg, step = load_run(lora_run)
    base = load_run(good_run)[0]
    assert step == 4 and not any(isinstance(m, LoRALinear) for m in model.modules())
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(n.split(".")[-2] in ("c_attn", "c_proj", "c_fc") for n in changed)  # only adapted matrices
    r = run_cli("generate", "--run", str(lora_run), "--prompt", "a", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["samples"]


def test_lora_and_distill_refusals(good_run, corpus_dir, data_cache, tmp_path):
    base = tiny_overrides(corpus_dir, data_cache, tmp_path / "x")
    cases = [
        (["train.lora_rank=4"], "init_from"),
        ([f'train.init_from="{good_run}"', "train.lora_rank=4", 'train.lora_targets=["wte"]'], "lora_targets"),
        ([f'train.init_from="{good_run}"', "train.lora_rank=4", 'train.backend="deepspeed"'], "DeepSpeed"),
        ([f'train.distill_from="{good_run}"', f'train.init_from="{good_run}"', "train.lora_rank=4"], "distill_from"),
        (["train.distill_from=\"/nonexistent\""], "distill_from"),
        ([f'train.distill_from="{good_run}"', "train.distill_alpha=1.5"], "distill_alpha"),
    ]
    for extra, word in cases:
        r = run_cli("train", "--config", str(REPO / "configs" / "tiny.toml"), *set_args(base + extra))
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "x" / "checkpoints").exists()


def test_distillation_trains_the_student_on_the_teachers_tokenizer(good_run, corpus_dir, data_cache, tmp_path):
    sets = tiny_overrides(corpus_dir, data_cache, tmp_path / "student", **{"train.max_steps": 3, "model.n_layer": 1})
    sets += [f'train.distill_from="{good_run}"', "train.distill_alpha=0.7", "train.distill_temperature=2.0"]
    r = run_cli("train", "--config", str(REPO / "configs" / "tiny.toml"), *set_args(sets))
    assert r.returncode == 0, r.stderr
    assert "teacher" in r.stdout and "frozen" in r.stdout
    student = tmp_path / "student"
    assert (student / "tokenizer.json").read_bytes() == (good_run / "tokenizer.json").read_bytes()
    assert load_run(student)[2].model.n_layer == 1


def test_distiller_objective_mixes_data_and_soft_targets():
    from minigpt.core.config import Config
    from minigpt.train.distill import Distiller

    torch.manual_seed(0)
    teacher, student = GPT(CFG), GPT(CFG)
    cfg = Config(model=CFG)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, :3] = -1  # ignored positions stay out of both terms
    for alpha in (0.0, 1.0):
        cfg.train.distill_alpha = alpha
        out, loss = Distiller(teacher, cfg).objective(student, x, y)
        if alpha == 0.0:
            assert loss.item() == pytest.approx(student(x, y).loss.item(), rel=1e-5) == pytest.approx(out.loss.item())
        else:
            assert loss.item() > 0 and out.loss.item() == pytest.approx(student(x, y).loss.item(), rel=1e-5)
    cfg.train.distill_alpha = 1.0
    assert Distiller(teacher, cfg).objective(teacher, x, y)[1].item() == pytest.approx(0.0, abs=1e-5)  # KL(p||p) = 0
    with pytest.raises(UserError):
        cfg.train.distill_alpha = 2.0
        cfg.train.validate()


def test_a_lora_run_exports_to_hf_merged(lora_run, tmp_path):
    import transformers  # a dev dependency: missing, this fails rather than skips
    r = run_cli("convert", "--to-hf", str(lora_run), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    model = load_run(lora_run)[0]
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ours = model(x).logits
        assert torch.allclose(hf(x).logits[..., : ours.size(-1)], ours, atol=1e-4)
