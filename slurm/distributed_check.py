"""Pre-flight check of a torch.distributed launch: run it under torchrun (slurm/torchrun.sbatch).

Every rank joins the process group (NCCL on GPUs, gloo on CPUs), each rank on a GPU node takes
the GPU its LOCAL_RANK names, and an all-reduce of the ranks must add up. Rank 0 prints one line
per rank (host, device, GPU name); the exit status is nonzero on any mismatch, including two
ranks of one host on one GPU.
"""

import os
import socket
import sys

import torch
import torch.distributed as dist


def main() -> int:
    local_rank = int(os.environ["LOCAL_RANK"])
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        if local_rank >= torch.cuda.device_count():
            print(f"rank {os.environ['RANK']}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs visible", file=sys.stderr)
            return 1
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    dist.init_process_group("nccl" if on_gpu else "gloo", device_id=device if on_gpu else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(total)
    uuid = str(torch.cuda.get_device_properties(device).uuid) if on_gpu else "-"
    me = (rank, socket.gethostname(), str(device), torch.cuda.get_device_name(device) if on_gpu else "cpu", uuid)
    everyone = [None] * world
    dist.all_gather_object(everyone, me)
    dist.destroy_process_group()
    if rank != 0:
        return 0
    problems = []
    if total.item() != world * (world + 1) / 2:
        problems.append(f"all-reduce of 1..{world} gave {total.item()}, expected {world * (world + 1) // 2}")
    gpus = [(host, uuid) for _, host, _, _, uuid in everyone if uuid != "-"]
    if len(set(gpus)) != len(gpus):
        problems.append("two ranks share one GPU")
    for r, host, dev, name, _ in everyone:
        print(f"rank {r}/{world}: host {host}, device {dev} ({name})")
    print("distributed check: " + ("; ".join(problems) if problems else f"ok, {world} ranks, {'nccl' if on_gpu else 'gloo'} all-reduce adds up"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
