"""Hugging Face interop: import and export of GPT-2 and Llama-family weights, checked against
`transformers` itself on small random-init models built here (no download); fine-tuning from
imported weights; HF config.json files as targets of the analytic commands."""

import json
import pickle
import shutil

import pytest
import torch
from conftest import run_cli, set_args, stdlib_files, tiny_overrides

from minigpt.analytic.flops import param_counts
from minigpt.core.hf_config import model_from_hf
from minigpt.infer.generate import generate_ids
from minigpt.nn.model import GPT
from minigpt.run.load import load_run

transformers = pytest.importorskip("transformers", reason="transformers (the [hf]/dev extra) verifies the conversion")

VOCAB = 300


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """HF folders of three small random-init models sharing one byte-level BPE tokenizer:
    GPT-2 (biases, tied head), Llama with GQA (untied head), Qwen2 (Q/K/V biases, tied head)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("hf")
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files()[:20]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    ids = dict(eos_token_id=0, bos_token_id=0)
    models_ = {
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2, **ids)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, initializer_range=0.2, **ids)),
        "qwen2": transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.2, **ids)),
    }
    torch.manual_seed(0)
    for name, model in models_.items():
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    for name in ("gpt2", "llama", "qwen2"):
        r = run_cli("convert", "--from-hf", str(hf_dirs / name), "--out", str(out / name))
        assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_imported_logits_and_greedy_tokens_equal_transformers(hf_dirs, imported, name):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs / name).eval()
    ours, _, cfg, step = load_run(imported / name)
    assert step == 0 and cfg.model.vocab_size == VOCAB
    idx = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx).logits).abs().max().item()
    assert diff < 1e-4
    prompt = idx[:1, :6]
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    got = generate_ids(ours, [prompt[0].tolist()], 24, temperature=0.0).new_tokens[0]
    assert got == want and len(set(want)) > 3  # varied tokens, not one repeated


def test_generate_command_on_an_imported_model_prints_transformers_greedy_text(hf_dirs, imported):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs / "llama").eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dirs / "llama")
    prompt = "def read(self, path):"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    want = tok.decode(out[0, ids.shape[1]:].tolist())
    want = want.split("<|endoftext|>")[0]
    r = run_cli("generate", "--run", str(imported / "llama"), "--prompt", prompt, "--temperature", "0",
                "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert f"{prompt}{want}\n" in r.stdout


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_export_loads_in_transformers_and_reimports_bit_identical(hf_dirs, imported, tmp_path, name):
    r = run_cli("convert", "--to-hf", str(imported / name), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    a = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs / name).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "<|endoftext|>" and tok("def f").input_ids
    assert run_cli("convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "again")).returncode == 0
    first = (imported / name / "checkpoints" / "step_0000000" / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "checkpoints" / "step_0000000" / "model.safetensors").read_bytes() == first


def test_a_trained_minigpt_run_exports_with_its_padding_rows_dropped(tiny_cfg, tmp_path):
    """A native run (vocabulary padded to 64, no biases: GPT-2 gets zero biases) gives an HF model
    whose logits are minigpt's."""
    from minigpt.train.loop import train

    cfg = tiny_cfg(**{"train.max_steps": 2, "train.eval_every": 0, "model.pad_vocab_multiple": 128})
    train(cfg, log=lambda *a, **k: None)
    assert cfg.model.padded_vocab_size > cfg.model.vocab_size
    r = run_cli("convert", "--to-hf", cfg.train.out_dir, "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_run(cfg.train.out_dir)[0]
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx).logits).abs().max().item() < 1e-4
    assert hf.config.vocab_size == cfg.model.vocab_size


def test_fine_tune_from_an_hf_folder_and_refuse_a_model_that_disagrees(hf_dirs, corpus_dir, data_cache, tmp_path):
    sets = tiny_overrides(corpus_dir, data_cache, tmp_path / "ft", **{"train.max_steps": 1, "train.lr": 1e-9, "train.min_lr": 0,
                                                                       "train.warmup_steps": 0, "train.eval_every": 0})
    sets = [s for s in sets if not s.startswith("model.")] + [f"train.init_from={hf_dirs / 'llama'}"]
    r = run_cli("train", *set_args(sets))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"init     weights of Hugging Face LlamaForCausalLM in {hf_dirs / 'llama'}; fresh optimizer")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs / "llama").state_dict()
    tuned = load_run(tmp_path / "ft")[0].state_dict()
    assert torch.allclose(tuned["blocks.0.mlp.c_proj.weight"], hf["model.layers.0.mlp.down_proj.weight"], atol=1e-6)
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["model"]["n_kv_head"] == 2 and saved["data"]["tokenizer"] == str(hf_dirs / "llama" / "tokenizer.json")
    r = run_cli("train", *set_args(sets + ["model.n_layer=3", f"train.out_dir={tmp_path / 'no'}"]))
    assert r.returncode == 2 and r.stderr.startswith("error: model.n_layer = 3 disagrees with the weights")
    assert not (tmp_path / "no").exists()


FAMILIES = {
    "llama3-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                      rope_theta=500000.0)),
    "llama3-70b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192)),
    "gpt2-xl": ("GPT2Config", dict(n_embd=1600, n_layer=48, n_head=25)),
    "mistral-7b": ("MistralConfig", {}),
    "qwen2-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "mixtral-8x7b": ("MixtralConfig", {}),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_config_parameter_counts_equal_transformers_on_meta(name):
    cls, kw = FAMILIES[name]
    config = getattr(transformers, cls)(**kw)
    with torch.device("meta"):
        want = transformers.AutoModelForCausalLM.from_config(config).num_parameters()
        c = model_from_hf(json.loads(config.to_json_string()))
        module = GPT(c).num_params()
    assert param_counts(c).total == module == want


def test_hf_config_json_is_a_target_for_flops_memory_and_extrapolate(tmp_path):
    transformers.LlamaConfig(**FAMILIES["llama3-8b"][1]).save_pretrained(tmp_path / "l3")
    path = str(tmp_path / "l3" / "config.json")
    flops = json.loads(run_cli("flops", "--config", path, "--seq-len", "128", "--json").stdout)
    assert flops["params_total"] == 8_030_261_248 and flops["exact_ratio_to_counted"] == 1.0
    memory = run_cli("memory", "--config", path, "--fake", "--batch-size", "1", "--seq-len", "64", "--json")
    assert memory.returncode == 0, memory.stderr
    assert json.loads(memory.stdout)["params_total"] == 8_030_261_248
    r = run_cli("extrapolate", "--target", str(tmp_path / "l3"), "--tokens", "15e12", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["params_total"] == 8_030_261_248 and out["train_tokens"] == 15e12
    ctx = FAMILIES["llama3-8b"][1]["max_position_embeddings"]
    assert out["sources"]["seq_len"].startswith(f"{ctx:,} tokens: the HF config's max_position_embeddings")
    r = run_cli("extrapolate", "--target", str(tmp_path / "l3"), "--tokens", "15e12", "--seq-len", "64", "--json")
    short = json.loads(r.stdout)
    assert short["sources"]["seq_len"] == "64 tokens: given (--seq-len)" and short["train_flops"] < out["train_flops"]


def test_extrapolate_predicts_an_eager_llama_slower_and_refuses_eager_experts(tmp_path):
    transformers.LlamaConfig(**FAMILIES["llama3-8b"][1]).save_pretrained(tmp_path / "l3")
    args = ("extrapolate", "--target", str(tmp_path / "l3"), "--tokens", "15e12", "--gpu", "H100", "--json")
    fused, eager = (json.loads(run_cli(*args, "--kernels", k).stdout) for k in ("fused", "eager"))
    assert "eager memory-bound kernels" in eager["mfu_source"] and "fused memory-bound" in fused["mfu_source"]
    assert eager["mfu"] < fused["mfu"]  # fp32 RMSNorm and RoPE op by op: more bytes over the same HBM
    transformers.MixtralConfig().save_pretrained(tmp_path / "mx")
    r = run_cli("extrapolate", "--target", str(tmp_path / "mx"), "--tokens", "1e12", "--kernels", "eager")
    assert r.returncode == 2 and r.stderr.startswith("error: eager kernel counts do not cover the part(s) mlp.router")
    assert not r.stdout
    r = run_cli(*args, "--kernels", "eager", "--mfu", "0.4")
    assert r.returncode == 2 and "drop --mfu" in r.stderr


class Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _bad_folders(hf_dirs, tmp_path):
    def copy(name, to):
        shutil.copytree(hf_dirs / name, tmp_path / to)
        return tmp_path / to

    no_weights = copy("llama", "no_weights")
    (no_weights / "model.safetensors").unlink()
    no_tokenizer = copy("llama", "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    bert = copy("llama", "bert")
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shapes = copy("llama", "shapes")
    raw = json.loads((shapes / "config.json").read_text())
    (shapes / "config.json").write_text(json.dumps({**raw, "intermediate_size": 128}))
    small_vocab = copy("llama", "small_vocab")
    raw = json.loads((small_vocab / "config.json").read_text())
    (small_vocab / "config.json").write_text(json.dumps({**raw, "vocab_size": 100}))
    pickled = copy("gpt2", "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    return {
        "no_weights": (no_weights, "has no weights: expected model.safetensors"),
        "no_config": (tmp_path / "empty", "has no config.json"),
        "no_tokenizer": (no_tokenizer, "has no tokenizer.json"),
        "bert": (bert, "model_type 'bert' is not supported; supported: gpt2, llama, mistral, qwen2, mixtral"),
        "shapes": (shapes, "tensor model.layers.0.mlp.gate_proj.weight has shape (96, 64), the config implies (128, 64)"),
        "small_vocab": (small_vocab, "has 300 tokens but config.json's vocab_size is 100"),
        "pickled": (pickled, "was refused by torch.load(weights_only=True)"),
    }


def test_bad_folders_get_one_line_and_no_output(hf_dirs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for name, (folder, message) in _bad_folders(hf_dirs, tmp_path).items():
        r = run_cli("convert", "--from-hf", str(folder), "--out", str(tmp_path / f"out_{name}"))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (name, r.stderr)
        assert not (tmp_path / f"out_{name}").exists() and not list(tmp_path.glob(f".out_{name}*")), name
    assert "pickled code ran" not in capsys.readouterr().out


def test_export_refuses_a_model_with_no_hf_equivalent(tiny_cfg, hf_dirs, imported, tmp_path):
    from minigpt.train.loop import train

    cfg = tiny_cfg(**{"train.max_steps": 1, "train.eval_every": 0, "model.norm": '"rmsnorm"'})
    train(cfg, log=lambda *a, **k: None)
    r = run_cli("convert", "--to-hf", cfg.train.out_dir, "--out", str(tmp_path / "hf"))
    assert r.returncode == 2 and r.stderr.startswith("error: model.pos_emb = 'learned', model.norm = 'rmsnorm'")
    assert not (tmp_path / "hf").exists()
    r = run_cli("convert", "--from-hf", str(hf_dirs / "llama"), "--out", str(imported / "gpt2"))
    assert r.returncode == 2 and "already exists and is not empty" in r.stderr
