"""Cost of a latent-ODE training iteration with the padded decoder and with the per-sample
decoder (RESULTS.md §10), measured in turn on the same batches and the same weights.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_latent_per_sample.py \
        --model runs/latent_ps_per_sample/model.pt --json runs/latent_ps_cost.json

The model and data are `odegrad train latent`'s defaults (spirals keeping half of the 100 grid
points, GRU encoder, latent 6, hidden 48, dopri5 rtol 1e-3 atol 1e-4, gradient="direct",
batch 32, float32). One iteration is the loss (encoder, reparameterised z_0, decoder solve,
likelihood) and its backward pass: "padded" decodes on the union of the batch's times (the
100-point grid), "per_sample" decodes each series at its own observed times with
per_sample=True. The two alternate batch by batch (--rounds passes over --batches batches),
so both see the same load of a shared machine; reported: the median CPU time
(time.process_time) and wall time per iteration, and the batched f calls per iteration.
--model loads trained weights (a run's model.pt): the step counts of a trained field are those
of training, larger than at initialisation. --times continuous: the spirals of `odegrad train
latent --times continuous` (each series observed at its own random times in the observation
window), so "padded" decodes on the union of the batch's observed times (about batch x the
times of one series) and the encoder reads each series' own gaps in both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from odegrad.data import make_spirals
from odegrad.models.latent import LatentODE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a run's model.pt")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--times", choices=("grid", "continuous"), default="grid",
                        help="the data's observation times (odegrad train latent --times)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the medians here (plot_latent_per_sample.py --cost)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = make_spirals(keep=0.5, times=args.times).train
    model = LatentODE(train.dim, 6, 48, 48, 0.1, encoder="gru", method="dopri5",
                      gradient="direct", rtol=1e-3, atol=1e-4, step_size=None, checkpoints=None)
    if args.model is not None:
        model.load_state_dict(torch.load(args.model, weights_only=True))
    values, mask, encoder_mask = train.values, train.mask, train.encoder_mask()
    union = []  # the padded decoder's output times per iteration
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(values), generator=generator)[:32]
               for _ in range(args.batches)]
    cpu = {False: [], True: []}
    wall = {False: [], True: []}
    calls = {False: [], True: []}
    for _ in range(args.rounds):
        for index in batches:
            for per_sample in (False, True):
                model.zero_grad()
                torch.manual_seed(1)  # the same z_0 draw for both decoders
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                t = train.t if train.times is None else train.times[index]
                loss = model(t, values[index], mask[index], encoder_mask[index],
                             per_sample=per_sample)
                loss.backward()
                cpu[per_sample].append(time.process_time() - start_cpu)
                wall[per_sample].append(time.perf_counter() - start_wall)
                calls[per_sample].append(model.block.stats["nfe_forward"])
    for index in batches:
        if train.times is None:
            union.append(len(train.t))
        else:
            seen = (mask[index] > 0) | (torch.arange(mask.shape[1]) == 0)
            union.append(len(torch.unique(train.times[index][seen])))
    print(f"torch {torch.__version__}, {args.rounds} rounds x {args.batches} batches of 32, "
          f"model {args.model or 'at initialisation'}, times {args.times}; padded output "
          f"times per batch: mean {statistics.mean(union):.1f}")
    print("| decoder | CPU ms / iteration (median) | wall ms / iteration (median) "
          "| batched f calls / iteration (mean) |")
    print("|---|---|---|---|")
    for per_sample, name in ((False, "padded (union of times)"),
                             (True, "per_sample=True (own times)")):
        print(f"| {name} | {1e3 * statistics.median(cpu[per_sample]):.1f} | "
              f"{1e3 * statistics.median(wall[per_sample]):.1f} | "
              f"{statistics.mean(calls[per_sample]):.1f} |")
    ratio = statistics.median(a / b for a, b in zip(cpu[True], cpu[False]))
    print(f"per_sample / padded CPU time, median over paired iterations: {ratio:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "cpu_ms": {"padded": 1e3 * statistics.median(cpu[False]),
                       "per_sample": 1e3 * statistics.median(cpu[True])},
            "paired_ratio": ratio, "rounds": args.rounds, "batches": args.batches,
            "f_calls": {"padded": statistics.mean(calls[False]),
                        "per_sample": statistics.mean(calls[True])},
            "times": args.times, "padded_output_times": statistics.mean(union),
            "model": str(args.model), "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
