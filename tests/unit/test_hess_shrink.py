"""LDLQ's --hess-shrink A: H_A = (1 − A) · H + A · Diag(H) (repq.quant.ldlq.shrink_hessian).

* the formula against an independent computation (shrinking the correlation matrix toward I);
* A = 0 is the code path of before: the same tensor object, the same recorded settings, the same
  bytes as calling the quantizers directly with the unshrunk H;
* A > 0 reaches every quantizer as the shrunk H (the same bytes as passing H_A with A = 0);
* bad values (A < 0, A > 1, NaN) are refused through the CLI: exit 2, one clear error line.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from repq.cli import app
from repq.quant.ldlq import shrink_hessian
from repq.quant.tensor import LdlqOptions

runner = CliRunner()


def _spd(n: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Σ x xᵀ / k of correlated inputs with uneven scales (float64); ``dead`` inputs are always 0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * n, n)) @ rng.standard_normal((n, n)) * rng.uniform(0.1, 10, n)
    x[:, list(dead)] = 0
    return torch.from_numpy(x.T @ x / len(x))


def _by_correlation(h: np.ndarray, a: float) -> np.ndarray:
    """Independent: R = D^-½ H D^-½, R_A = (1 − A) R + A I, H_A = D^½ R_A D^½ (inputs with d > 0)."""
    d = np.sqrt(np.diag(h))
    r = h / np.outer(d, d)
    r_a = (1 - a) * r + a * np.eye(len(h))
    return r_a * np.outer(d, d)


@pytest.mark.parametrize("a", [0.0, 0.1, 0.3, 0.6, 1.0])
def test_formula_matches_the_correlation_shrinkage(a):
    h = _spd(48, seed=1)
    got = shrink_hessian(h, a)
    np.testing.assert_allclose(got.numpy(), _by_correlation(h.numpy(), a), rtol=1e-12, atol=1e-12)
    # elementwise: off-diagonal scaled by 1 − A, diagonal exactly kept; input not modified
    off = ~torch.eye(48, dtype=torch.bool)
    assert torch.equal(got.diagonal(), h.diagonal())
    np.testing.assert_allclose(got[off].numpy(), (1 - a) * h[off].numpy(), rtol=1e-15)
    assert torch.equal(h, _spd(48, seed=1))
    assert torch.linalg.eigvalsh(got).min() > 0   # convex combination of PD matrices: still PD


def test_dead_inputs_stay_dead_and_one_is_the_diagonal():
    h = _spd(32, seed=2, dead=(3, 17))
    for a in (0.25, 1.0):
        s = shrink_hessian(h, a)
        assert not s[3].any() and not s[:, 17].any()   # damp_hessian still sees them as dead
    assert torch.equal(shrink_hessian(h, 1.0), torch.diag(h.diagonal()))


def test_zero_is_the_path_of_before():
    h = _spd(16, seed=3)
    assert shrink_hessian(h, 0.0) is h   # no copy, no arithmetic
    # recorded settings (repq.config, distill identity, sensitivity files) at 0 are those of before the option
    assert LdlqOptions(hess_shrink=0.0).to_dict() == {"damp": 0.01, "act_order": True, "scales": "static",
                                                      "refit": True}
    assert LdlqOptions(hess_shrink=0.3).to_dict()["hess_shrink"] == 0.3


def test_the_default_is_recorded_and_the_same_everywhere_ldlq_runs_from_quantize():
    """`repq quantize` (the command, its pipeline config), LDLQ's options and the bit allocator's sensitivity
    (which builds LdlqOptions()) share one default, and files record it."""
    import inspect

    from repq.commands.quantize import quantize
    from repq.quant import DEFAULT_HESS_SHRINK
    from repq.quant.pipeline import QuantizeConfig

    assert 0 < DEFAULT_HESS_SHRINK < 1
    assert LdlqOptions().hess_shrink == DEFAULT_HESS_SHRINK == LdlqOptions().to_dict()["hess_shrink"]
    assert QuantizeConfig(ftype="Q4_0").ldlq_options() == LdlqOptions()
    assert inspect.signature(quantize).parameters["hess_shrink"].default == DEFAULT_HESS_SHRINK


def test_distill_identity_unchanged_at_zero():
    from repq.distill.config import DistillConfig
    from repq.quant import DEFAULT_HESS_SHRINK

    assert "hess_shrink" not in DistillConfig(ftype="Q4_0", hess_shrink=0.0).to_dict()   # runs made before the option
    assert DistillConfig(ftype="Q4_0").hess_shrink == DEFAULT_HESS_SHRINK == DistillConfig(ftype="Q4_0").to_dict()["hess_shrink"]
    assert DistillConfig(ftype="Q4_0").identity() != DistillConfig(ftype="Q4_0", hess_shrink=0.5).identity()
    assert DistillConfig(ftype="Q4_0", hess_shrink=0.5).ldlq_options().hess_shrink == 0.5


@pytest.mark.parametrize("fmt", ["IQ3_S", "Q4_0", "Q3_K"])
def test_quantize_tensor_sees_the_shrunk_hessian(native, fmt):
    """Through quantize_tensor (every command's per-tensor path): A = 0 writes the bytes the
    quantizer itself writes for H, and A = 0.4 the bytes of passing H_0.4 with A = 0."""
    from repq import mix
    from repq.ggml.types import F32, type_id
    from repq.quant.iq_ldlq import ldlq_quantize_iq
    from repq.quant.kquant import ldlq_quantize
    from repq.quant.tensor import quantize_tensor

    n, rows = 256, 16
    rng = np.random.default_rng(4)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    h = _spd(n, seed=5)
    gt = type_id(fmt)
    plan = mix.TensorPlan("blk.0.ffn_up.weight", F32, gt, True, False, False)

    def q(hh, a):
        return quantize_tensor(plan, w, hessian=hh, ldlq=LdlqOptions(hess_shrink=a), threads=1)

    direct = (ldlq_quantize_iq(w, h, gt, threads=1) if fmt == "IQ3_S" else ldlq_quantize(w, h, gt, threads=1))
    r0 = q(h, 0.0)
    assert r0.method == "ldlq"
    assert np.array_equal(r0.raw, np.ascontiguousarray(direct.raw).reshape(-1).view(np.uint8))
    r_a = q(h, 0.4)
    r_pre = q(shrink_hessian(h, 0.4), 0.0)
    assert np.array_equal(r_a.raw, r_pre.raw)
    assert not np.array_equal(r_a.raw, r0.raw)   # it does change the result
    assert math.isclose(r_a.proxy_rel_err, r_pre.proxy_rel_err, rel_tol=1e-12)


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "inf"])
def test_bad_values_are_refused(tmp_path, value):
    """Checked with the other options, before the model is read (it does not even exist here)."""
    r = runner.invoke(app, ["quantize", str(tmp_path / "m.gguf"), str(tmp_path / "o.gguf"), "--fmt", "IQ3_S",
                            "--hessian", str(tmp_path / "hess"), "--hess-shrink", value])
    assert r.exit_code == 2, r.output
    assert "--hess-shrink must be in [0, 1]" in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("value", ["-1", "2", "nan"])
def test_bad_values_are_refused_by_distill(tmp_path, value):
    (tmp_path / "m.gguf").write_bytes(b"")   # only has to exist: the settings are checked first
    r = runner.invoke(app, ["distill", str(tmp_path / "m.gguf"), str(tmp_path / "o.gguf"), "--fmt", "IQ3_S",
                            "--data", str(tmp_path / "d.txt"), "--hess-shrink", value])
    assert r.exit_code == 2, r.output
    assert "--hess-shrink must be in [0, 1]" in r.stderr, r.output


def test_without_ldlq_is_refused(tmp_path):
    r = runner.invoke(app, ["quantize", str(tmp_path / "m.gguf"), str(tmp_path / "o.gguf"), "--fmt", "Q4_0",
                            "--hess-shrink", "0.3"])
    assert r.exit_code == 2 and "--hess-shrink only apply to --method ldlq" in r.stderr, r.output
