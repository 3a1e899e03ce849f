"""GPU only: flex_attention BlockMask path — mask vs gather logits and gradients (fp32)."""

import sys

import torch

sys.path.insert(0, "tests")
from test_executors import _rel, padded_batch  # noqa: E402

from speed_train.speed.executors import speed_loss  # noqa: E402
from speed_train.speed.tiny import tiny_model  # noqa: E402

assert torch.cuda.is_available(), "needs a GPU"
for arch in ("llama", "qwen3", "olmo2"):
    for K in (1, 2, 3):
        model = tiny_model(arch, layers=4).cuda()
        batch = padded_batch("bos").to("cuda")
        grads = {}
        for backend in ("sdpa", "flex"):
            for ex in ("mask", "gather"):
                model.zero_grad(set_to_none=True)
                loss = speed_loss(model, batch, K, executor=ex, backend=backend)
                loss.mean.backward()
                grads[(backend, ex)] = (
                    loss.loss_sum.item(),
                    {n: p.grad.clone() for n, p in model.named_parameters()},
                )
        ref_loss, ref = grads[("sdpa", "mask")]
        worst = max(_rel(g[n], ref[n]) for _, (_, g) in grads.items() for n in ref)
        dl = max(abs(v[0] - ref_loss) / abs(ref_loss) for v in grads.values())
        print(
            f"{arch} K={K}: max relative grad diff {worst:.2e}, loss diff {dl:.2e}",
            "OK" if worst < 1e-4 else "FAIL",
        )
