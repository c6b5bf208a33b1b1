import pytest
import torch

from megatron_vespo.logprobs import logprobs_from_hidden, vocab_parallel_logprobs
from tests.conftest import torchrun


def naive(logits, rows, targets, temperature):
    logp_all = torch.log_softmax(logits.float()[rows] / temperature, dim=-1)
    logp = logp_all.gather(1, targets.unsqueeze(1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("chunk", [1, 3, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_single_shard_matches_log_softmax(chunk, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(11, 97, generator=gen)).requires_grad_(True)
    rows = torch.tensor([0, 2, 3, 7, 10])
    targets = torch.randint(0, 97, (5,), generator=gen)
    weights = torch.randn(5, generator=gen)
    logp, entropy = vocab_parallel_logprobs(logits, rows, targets, temperature=temperature, chunk_tokens=chunk)
    (grad,) = torch.autograd.grad((logp * weights).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_logp, ref_entropy = naive(ref_logits, rows, targets, temperature)
    (ref_grad,) = torch.autograd.grad((ref_logp * weights).sum(), ref_logits)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert grad[1].abs().sum() == 0  # rows not asked for get no gradient
    assert logp.dtype == torch.float32 and not entropy.requires_grad


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_gradient_matches_autograd_of_the_full_softmax(inplace, temperature):
    """entropy_grad: d(sum a H + b log p)/d logits as autograd of log_softmax gives it, also where
    probabilities underflow to 0 (logits of +-80)."""
    gen = torch.Generator().manual_seed(5)
    base = 3 * torch.randn(11, 97, generator=gen)
    base[3, :40] = -80.0  # exp underflows in fp32: p log p must stay 0, not NaN
    base[7, 5] = 80.0
    rows, targets = torch.tensor([0, 2, 3, 7, 10]), torch.randint(0, 97, (5,), generator=gen)
    a, b = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    leaf = base.clone().requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs(leaf * 1.0, rows, targets, temperature=temperature, chunk_tokens=2,
                                            inplace_grad=inplace, entropy_grad=True)
    (grad,) = torch.autograd.grad((a * entropy + b * logp).sum(), leaf)
    ref = base.double().requires_grad_(True)
    ref_logp, ref_entropy = (torch.log_softmax(ref[rows] / temperature, -1).gather(1, targets.unsqueeze(1)).squeeze(1),
                             -(torch.special.xlogy(torch.softmax(ref[rows] / temperature, -1),
                                                   torch.softmax(ref[rows] / temperature, -1))).sum(-1))
    (ref_grad,) = torch.autograd.grad((a.double() * ref_entropy + b.double() * ref_logp).sum(), ref)
    assert torch.isfinite(grad).all() and entropy.requires_grad
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    # without entropy_grad the entropy stays detached and only log p has a gradient
    logp, entropy = vocab_parallel_logprobs(base.clone().requires_grad_(True), rows, targets)
    assert not entropy.requires_grad


def test_bf16_logits_compute_in_fp32_and_return_bf16_grad():
    gen = torch.Generator().manual_seed(1)
    logits32 = torch.randn(6, 50, generator=gen)
    logits = logits32.bfloat16().requires_grad_(True)
    rows, targets = torch.arange(6), torch.randint(0, 50, (6,), generator=gen)
    logp, _ = vocab_parallel_logprobs(logits, rows, targets)
    ref, _ = naive(logits.detach().float(), rows, targets, 1.0)
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-5)
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="logits must be"):
        vocab_parallel_logprobs(torch.zeros(2, 3, 4), torch.arange(2), torch.arange(2))
    with pytest.raises(ValueError, match="rows"):
        vocab_parallel_logprobs(torch.zeros(2, 4), torch.arange(2), torch.arange(3))
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(torch.zeros(2, 4), torch.arange(2), torch.arange(2), temperature=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_full_vocabulary(tp):
    """Real TP groups on gloo: values, entropy, gradients, and one all-gather per call."""
    proc = torchrun("logprobs_tp.py", tp)
    assert "LOGPROBS_TP_OK" in proc.stdout


def test_inplace_gradient_reuses_logits_memory_and_matches():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(9, 40, generator=gen)
    rows, targets = torch.tensor([1, 4, 5]), torch.randint(0, 40, (3,), generator=gen)
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_(True)
        logits = leaf * 1.0  # a non-leaf, like a model's output
        logp, _ = vocab_parallel_logprobs(logits, rows, targets, inplace_grad=inplace, chunk_tokens=2)
        captured = {}
        logits.register_hook(lambda g: captured.update(ptr=g.data_ptr()))
        logp.sum().backward()
        grads.append(leaf.grad)
        assert (captured["ptr"] == logits.data_ptr()) == inplace
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)
    assert grads[1][0].abs().sum() == 0 and grads[1][1].abs().sum() > 0


@pytest.mark.parametrize("chunk", [1, 4, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_hidden_states_match_the_logits_path(chunk, dtype):
    """Chunked hidden @ weight.T (then the logit scale) gives what the full logits give."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(10, 16, generator=gen).to(dtype)
    weight = torch.randn(37, 16, generator=gen).to(dtype)
    targets = torch.randint(0, 37, (10,), generator=gen)
    scale = lambda z: z * 0.5  # noqa: E731 -- a MuP-like output scale
    logp, entropy = logprobs_from_hidden(hidden, weight, targets, temperature=0.7, chunk_tokens=chunk,
                                         scale_logits=scale)
    ref_logp, ref_entropy = vocab_parallel_logprobs(scale(hidden @ weight.t()), torch.arange(10), targets,
                                                    temperature=0.7)
    torch.testing.assert_close(logp, ref_logp.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-6)
    assert logp.dtype == torch.float32 and not logp.requires_grad
    wrong, _ = logprobs_from_hidden(hidden, weight, targets, temperature=0.7, chunk_tokens=chunk)
    assert (wrong - logp).abs().max() > 1e-2  # the scale is applied, not dropped


def test_logprobs_from_hidden_states_name_bad_shapes():
    with pytest.raises(ValueError, match="must agree"):
        logprobs_from_hidden(torch.zeros(3, 4), torch.zeros(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="one per row"):
        logprobs_from_hidden(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_hidden(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), temperature=0)
