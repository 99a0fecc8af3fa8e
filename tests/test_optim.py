"""BertAdam (multi-tensor form) against the published per-tensor loop written out here: the same bits."""
import torch

from transformer.model import BertForGlue
from transformer.train import BertAdam, param_groups
from tests.conftest import TINY


class PerTensorBertAdam(torch.optim.Optimizer):
    """The published BertAdam, one parameter at a time (the implementation BertAdam replaced)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["max_grad_norm"] > 0:
                    g = g * (group["max_grad_norm"] / (g.norm() + 1e-6)).clamp(max=1.0)
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update = update + group["weight_decay"] * p
                p.add_(update, alpha=-group["lr"])


def test_bertadam_equals_the_per_tensor_loop_bit_for_bit():
    models = [BertForGlue(TINY), BertForGlue(TINY)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [BertAdam(param_groups(models[0], 0.01), lr=1e-3), PerTensorBertAdam(param_groups(models[1], 0.01), lr=1e-3)]
    g = torch.Generator().manual_seed(0)
    names = [n for n, _ in models[0].named_parameters()]
    for step in range(4):
        for i, n in enumerate(names):
            # large and small gradients (clipped and not), one parameter without a gradient every step
            grad = None if i % 7 == step else torch.randn(dict(models[0].named_parameters())[n].shape, generator=g) * (5.0 if i % 2 else 0.01)
            for m in models:
                dict(m.named_parameters())[n].grad = None if grad is None else grad.clone()
        for o in opts:
            o.step()
        for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"step {step}, {n}: {m}")
    for a, b in zip(opts[0].state.values(), opts[1].state.values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=0)


def test_bertadam_state_dict_round_trip():
    # an optimizer restored from a state dict takes the same next step, to the bit, as the one that saved it
    import copy
    model = BertForGlue(TINY).eval()  # no dropout: both models see the same forward
    opt = BertAdam(param_groups(model, 0.01), lr=1e-3)
    ids = torch.randperm(TINY.vocab_size - 5)[:14].view(2, 7) + 5  # no repeated token: the embedding backward sums no rows
    args = (ids, torch.zeros(2, 7, dtype=torch.long), torch.ones(2, 7, dtype=torch.bool))
    model(*args).logits.sum().backward()
    opt.step()
    twin = copy.deepcopy(model)
    again = BertAdam(param_groups(twin, 0.01), lr=1e-3)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from disk (torch would share unchanged tensors)
    for a, b in zip(opt.state.values(), again.state.values()):
        assert a.keys() == b.keys() == {"exp_avg", "exp_avg_sq"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    for m, o in ((model, opt), (twin, again)):
        o.zero_grad(set_to_none=True)
        m(*args).logits.square().sum().backward()
        o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
