"""The bilinear fused-difference SAE against the same model with d materialised (acceptance a)."""

from __future__ import annotations

import torch

from misp_dpo.sae.paper import FusedDifferenceSAE, dense_reference, kl_sparsity


def _model_and_block(dim: int = 16, latents: int = 12, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    model = FusedDifferenceSAE(dim, latents, rho=0.05, gamma=1.0)
    mean = torch.randn(dim, dim, generator=generator) * 0.01
    model.initialise(generator, mean, scale=3.0)
    with torch.no_grad():  # a trained-looking model: a non-zero decoder, varied biases
        model.W_enc.mul_(0.2).add_(0.05 * torch.randn(model.W_enc.shape, generator=generator))
        model.W_dec.copy_(torch.randn(model.W_dec.shape, generator=generator) / dim)
        model.b_enc.add_(torch.randn(latents, generator=generator))
    positive = torch.nn.functional.normalize(torch.randn(5, dim, generator=generator), dim=-1)
    candidates = torch.nn.functional.normalize(torch.randn(5, 7, dim, generator=generator), dim=-1)
    prompt = torch.nn.functional.normalize(torch.randn(5, dim, generator=generator), dim=-1)
    mask = torch.rand(5, 7, generator=generator) > 0.2
    dv = (positive[:, None, :] - candidates) * model.scale
    return model, dv, prompt, mask


def _dense_loss(model: FusedDifferenceSAE, dv: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> tuple:
    out = dense_reference(model, dv, t)
    weight = mask.float()
    recon = (out.error * weight).sum() / weight.sum()
    rho_hat = (out.z * weight[..., None]).sum((0, 1)) / weight.sum()
    return recon + model.gamma * kl_sparsity(model.rho, rho_hat), out


def test_bilinear_equals_dense_at_d16() -> None:
    model, dv, t, mask = _model_and_block()
    bilinear = model.loss(dv, t, mask)
    grads = torch.autograd.grad(bilinear.loss, list(model.parameters()))
    dense_loss, dense = _dense_loss(model, dv, t, mask)
    dense_grads = torch.autograd.grad(dense_loss, list(model.parameters()))
    torch.testing.assert_close(bilinear.output.pre, dense.pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bilinear.output.error, dense.error, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bilinear.loss, dense_loss, rtol=1e-5, atol=1e-5)
    for (name, _), g, h in zip(model.named_parameters(), grads, dense_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")
    assert bilinear.recon > 0 and dense.error.min() > 0


def test_gradient_wrt_inputs_matches_too() -> None:
    """The encoder is exact in Δv and t separately, not only for the weights."""
    model, dv, t, mask = _model_and_block(seed=1)
    dv, t = dv.clone().requires_grad_(), t.clone().requires_grad_()
    g_bilinear = torch.autograd.grad(model.loss(dv, t, mask).loss, (dv, t))
    g_dense = torch.autograd.grad(_dense_loss(model, dv, t, mask)[0], (dv, t))
    for g, h in zip(g_bilinear, g_dense, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)


def test_initial_activation_is_rho_and_kl_vanishes() -> None:
    _, dv, t, mask = _model_and_block(seed=2)
    model = FusedDifferenceSAE(16, 12, rho=0.05)
    model.initialise(torch.Generator().manual_seed(0), torch.zeros(16, 16), scale=1.0)
    with torch.no_grad():
        model.W_enc.zero_()
    out = model.loss(dv, t, mask)
    torch.testing.assert_close(out.rho_hat, torch.full((model.latents,), 0.05))
    assert float(out.kl.detach()) < 1e-6
