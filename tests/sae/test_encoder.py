"""`load_sae` + `encode_pools`, the contract the mine stage relies on, and the safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from misp_dpo.errors import UserError
from misp_dpo.sae import PoolCodes, SaeSpec, load_sae
from misp_dpo.sae.checkpoint import WEIGHTS, write_config, write_weights
from misp_dpo.sae.paper import dense_reference

CLIP = {"model": "tiny", "pretrained": "", "fingerprint": "fake:tiny", "dim": 8}


def save(folder: Path, spec: SaeSpec, seed: int = 0, scale: float = 2.0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = spec.build()
    mean_shape = (spec.dim, spec.dim) if spec.variant == "paper" else (spec.dim,)
    model.initialise(generator, 0.1 * torch.randn(mean_shape, generator=generator), scale)
    with torch.no_grad():
        model.W_enc.add_(0.3 * torch.randn(model.W_enc.shape, generator=generator))
        model.W_dec.add_(0.3 * torch.randn(model.W_dec.shape, generator=generator))
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(model, folder / WEIGHTS)
    write_config(spec, {"clip": CLIP}, folder / "cfg.json")
    return model


def pools(seed: int = 0, pairs: int = 6, width: int = 5, dim: int = 8) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    unit = lambda *shape: (lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True))(  # noqa: E731
        rng.standard_normal(shape).astype(np.float32)
    )
    mask = rng.random((pairs, width)) > 0.3
    return unit(pairs, dim), unit(pairs, width, dim), unit(pairs, dim), mask


def test_paper_codes_and_errors_match_the_dense_model(tmp_path: Path) -> None:
    model = save(tmp_path / "sae", SaeSpec("paper", dim=8, latents=6))
    encoder = load_sae(tmp_path / "sae", device="cpu")
    assert (encoder.variant, encoder.latents, encoder.clip) == ("paper", 6, CLIP)
    positive, candidates, prompt, mask = pools()
    out = encoder.encode_pools(positive, candidates, prompt, mask)
    assert isinstance(out, PoolCodes)
    assert out.codes.shape == (6, 5, 6) and out.codes.dtype == np.float32
    assert out.recon_error.shape == (6, 5) and out.recon_error.dtype == np.float32
    dv = torch.from_numpy(positive[:, None] - candidates) * 2.0
    dense = dense_reference(model, dv, torch.from_numpy(prompt))
    expected_z = np.where(mask[..., None], dense.z.detach().numpy(), 0)
    expected_err = np.where(mask, dense.error.detach().numpy() / 4.0, 0)
    np.testing.assert_allclose(out.codes, expected_z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.recon_error, expected_err, rtol=1e-4, atol=1e-6)
    assert (out.recon_error[mask] > 0).all()


def test_topk_codes_are_candidate_minus_positive(tmp_path: Path) -> None:
    model = save(tmp_path / "sae", SaeSpec("topk", dim=8, latents=32, k=4))
    encoder = load_sae(tmp_path / "sae", device="cpu")
    positive, candidates, prompt, mask = pools(seed=1)
    out = encoder.encode_pools(positive, candidates, prompt, mask)
    with torch.no_grad():
        x_c = torch.from_numpy(candidates[2, 1]) * 2.0
        z_c = model.dense_codes(model(x_c[None]))[0]
        z_p = model.dense_codes(model(torch.from_numpy(positive[2])[None] * 2.0))[0]
        err = float(((x_c - model(x_c[None]).x_hat[0]) ** 2).sum()) / 4.0
    assert mask[2, 1]
    np.testing.assert_allclose(out.codes[2, 1], (z_c - z_p).numpy(), atol=1e-6)
    np.testing.assert_allclose(out.recon_error[2, 1], err, rtol=1e-5)
    assert (np.count_nonzero(out.codes, axis=2)[mask] <= 8).all()
    assert not out.codes[~mask].any() and not out.recon_error[~mask].any()


def test_chunking_does_not_change_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path / "sae", SaeSpec("paper", dim=8, latents=6))
    encoder = load_sae(tmp_path / "sae", device="cpu")
    block = pools(seed=2, pairs=9)
    whole = encoder.encode_pools(*block)
    monkeypatch.setattr("misp_dpo.sae.encoder.CHUNK_ELEMENTS", 1)  # one pair per chunk
    single = encoder.encode_pools(*block)
    np.testing.assert_allclose(single.codes, whole.codes, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(single.recon_error, whole.recon_error, rtol=1e-5, atol=1e-7)


def test_safetensors_round_trip_is_exact(tmp_path: Path) -> None:
    for variant in ("paper", "topk"):
        model = save(tmp_path / variant, SaeSpec(variant, dim=8, latents=16, k=3))
        stored = load_file(str(tmp_path / variant / WEIGHTS))
        loaded = load_sae(tmp_path / variant, device="cpu").model.state_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(stored[name], tensor) and torch.equal(loaded[name], tensor), name


def test_a_folder_that_is_not_an_sae_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not an `sae` output") as error:
        load_sae(tmp_path, device="cpu")
    assert "\n" not in str(error.value)
    save(tmp_path / "bad", SaeSpec("paper", dim=8, latents=6))
    (tmp_path / "bad" / WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(UserError, match="does not match"):
        load_sae(tmp_path / "bad", device="cpu")


def test_wrong_dimension_is_refused(tmp_path: Path) -> None:
    save(tmp_path / "sae", SaeSpec("paper", dim=8, latents=6))
    positive, candidates, prompt, mask = pools(dim=6)
    with pytest.raises(ValueError, match="D=8"):
        load_sae(tmp_path / "sae", device="cpu").encode_pools(positive, candidates, prompt, mask)
