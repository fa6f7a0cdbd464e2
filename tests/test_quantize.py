"""Weight-only quantization (nn/quantize.py): close to full precision, smaller, refused where it cannot
run, and reachable from generate / eval / bench decode."""

import copy
import json

import pytest
import torch
from conftest import run_cli

from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError
from minigpt.nn.model import GPT
from minigpt.nn.quantize import QuantizedLinear, quantize_int4, quantize_int8, quantize_model, weight_bytes

CFG = ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=512)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_int8_and_int4_reconstruct_the_weight_within_their_step():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    q4, sz = quantize_int4(w, 32)
    assert q4.min() >= 0 and q4.max() <= 15 and sz.shape == (4, 64, 2)
    scales, zeros = sz[..., 0].float().t(), sz[..., 1].float().t()  # (64, 4)
    deq = ((q4.float().reshape(64, 4, 32) - 8) * scales[..., None] + zeros[..., None]).reshape(64, 128)
    assert (deq - w).abs().max() <= scales.max() / 2 + 0.02  # half a step (bf16 scales add a little)


@pytest.mark.parametrize("mode, tol, agree", [("int8", 0.03, 0.95), ("int4", 0.25, 0.6)])
def test_quantized_logits_stay_close_and_greedy_tokens_mostly_agree(model, mode, tol, agree):
    x = torch.randint(0, CFG.vocab_size, (2, 48))
    q = quantize_model(copy.deepcopy(model), mode)
    with torch.no_grad():
        ref, out = model(x).logits, q(x).logits
        assert ((out - ref).norm() / ref.norm()).item() < tol
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= agree
        assert q(x, targets=x).loss.item() == pytest.approx(model(x, targets=x).loss.item(), rel=tol)
    swapped = [m for m in q.modules() if isinstance(m, QuantizedLinear)]
    assert len(swapped) == 2 * 4 + 1  # c_attn, c_proj, c_fc, c_proj per block, and the head


def test_weight_bytes_shrink_about_four_and_eight_fold(model):
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    b8 = weight_bytes(quantize_model(copy.deepcopy(model), "int8"))
    b4 = weight_bytes(quantize_model(copy.deepcopy(model), "int4"))
    assert linear <= b8["quantized_bytes"] < 1.1 * linear  # 1 byte a weight plus the scales
    assert 0.5 * linear <= b4["quantized_bytes"] < 0.7 * linear  # half a byte plus a scale and a zero per 32
    assert b8["read_per_decode_step_bytes"] < b8["total_bytes"]  # the tied embedding's copy is not read per step


def test_refused_where_it_cannot_run():
    with pytest.raises(UserError, match="int4"):
        quantize_model(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=48, block_size=16, vocab_size=128)), "int4")
    with torch.device("meta"):
        meta = GPT(CFG)
    with pytest.raises(UserError, match="CPU only"):
        quantize_model(meta, "int8")


def test_generate_and_eval_take_quantize(good_run):
    r = run_cli("generate", "--run", str(good_run), "--prompt", "def", "--max-new-tokens", "5", "--quantize", "int8",
                "--json", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quantize"] == "int8"
    full = json.loads(run_cli("eval", "--run", str(good_run), "--data", "val", "--json").stdout)
    q = json.loads(run_cli("eval", "--run", str(good_run), "--data", "val", "--json", "--quantize", "int8").stdout)
    assert q["quantize"] == "int8" and q["loss_nats_per_token"] == pytest.approx(full["loss_nats_per_token"], rel=0.02)
    r = run_cli("eval", "--run", str(good_run), "--data", "val", "--quantize", "int3")
    assert r.returncode == 2 and "int3" in r.stderr


def test_extrapolate_serves_quantized_weights_beside_the_full_fleet():
    from minigpt.analytic.extrapolate import extrapolate
    from minigpt.analytic.scenario import Scenario
    from minigpt.core.hardware import gpu_by_name
    from minigpt.core.resolve import target_config

    cfg = target_config("gpt3-13b")
    serve = {"users": 1e5, "requests_per_hour": 1, "tokens_per_request": 1000, "utilisation": 0.5}
    full = extrapolate(cfg.model, cfg.target, Scenario(gpu_by_name("A100"), mfu=0.4, serve=serve))
    r = extrapolate(cfg.model, cfg.target, Scenario(gpu_by_name("A100"), mfu=0.4, serve=serve, quantize="int4"))
    q = r["serving_at_user_speed_quantized"]
    assert r["serving_at_user_speed"] == full["serving_at_user_speed"]  # the uncompressed fleet is unchanged beside it
    assert q["quantize"] == "int4" and q["weight_bytes_source"].startswith("assumed")
    assert q["num_gpus"] <= full["serving_at_user_speed"]["num_gpus"]
    assert "serving_at_user_speed_quantized" not in full


def test_a_quantized_run_saves_reloads_and_refuses_training_and_export(good_run, tmp_path):
    from minigpt.nn.quantize import quantize_model
    from minigpt.run.load import load_run

    out = tmp_path / "q8"
    r = run_cli("convert", "--quantize-run", str(good_run), "--quantize", "int8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    saved, _, cfg, _ = load_run(out)
    live = quantize_model(load_run(good_run)[0], "int8")
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert cfg.model.quantization == "int8" and torch.equal(saved(x).logits, live(x).logits)
    assert json.loads((out / "quantized.json").read_text())["quantization"] == "int8"
    r = run_cli("convert", "--to-hf", str(out), "--out", str(tmp_path / "hf"))
    assert r.returncode == 2 and "quantized" in r.stderr and not (tmp_path / "hf").exists()
    r = run_cli("generate", "--run", str(out), "--prompt", "a", "--max-new-tokens", "2", "--quantize", "int4")
    assert r.returncode == 2 and "quantized already" in r.stderr
    r = run_cli("convert", "--quantize-run", str(good_run), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "give both" in r.stderr


def test_extrapolate_serves_a_distilled_student_beside_the_target():
    r = run_cli("extrapolate", "--target", "gpt3-175b", "--gpu", "A100", "--serve", "--users", "1e6",
                "--requests-per-hour", "1", "--words-per-request", "750", "--utilisation", "0.5", "--distilled",
                "gpt3-13b", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    st, full = d["serving_at_user_speed_student"], d["serving_at_user_speed"]
    assert st["student"] == "gpt3-13b" and st["student_params"] < d["params_total"] / 10
    assert st["num_gpus"] < full["num_gpus"] and st["quality_source"].startswith("assumed")
