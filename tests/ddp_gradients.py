"""Run by test_train.py: one generator step and one discriminator step on 1 process (global batch)
and on 2 gloo processes (half each, DDP, synchronized batch norm); writes every parameter's gradient."""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from spade.config import Settings
from spade.nn import MultiscaleDiscriminator
from spade.train.objective import GeneratorSide, Objective, init_weights
from spade.train.sync_batchnorm import convert_sync_batchnorm

MODEL = {"preset": "custom", "label_nc": 8, "contain_dontcare_label": False, "use_instance": False,
         "crop_size": 32, "ngf": 8, "ndf": 8, "spade_hidden": 16}  # fmt: skip
SETTINGS = Settings.from_dict({"model": MODEL, "train": {"vgg_loss": False}})


def nets_and_batch():
    torch.manual_seed(0)
    g, d = GeneratorSide(SETTINGS.model), MultiscaleDiscriminator.from_config(SETTINGS.model)
    init_weights(g)
    init_weights(d)
    torch.manual_seed(1)
    label = torch.randint(0, 8, (4, 1, 32, 32))
    return g, d, {"label": label, "instance": label, "image": torch.rand(4, 3, 32, 32) * 2 - 1}


def gradients(g, d, g_model, d_model, batch, world: int) -> dict:
    objective = Objective(SETTINGS.model, SETTINGS.train, None, world_size=world)
    seg, real = objective.inputs(batch, torch.device("cpu"), False)
    sum(objective.generator_losses(g_model, d_model, seg, real).values()).backward()
    out = {f"G.{n}": p.grad.clone() for n, p in g.named_parameters()}
    d.zero_grad()
    sum(objective.discriminator_losses(g_model, d_model, seg, real).values()).backward()
    out.update({f"D.{n}": p.grad.clone() for n, p in d.named_parameters()})
    return out


def main(out: str) -> None:
    torch.set_num_threads(1)
    g, d, batch = nets_and_batch()
    if "RANK" not in os.environ:
        torch.save(gradients(g, d, g, d, batch, 1), out)
        return
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = convert_sync_batchnorm(g, "cpu")
    half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    grads = gradients(g, d, DDP(g), DDP(d), half, 2)
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
