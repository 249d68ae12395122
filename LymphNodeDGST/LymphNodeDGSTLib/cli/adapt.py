"""`lndgst adapt`: start (and optionally follow) a background adaptation job."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from LymphNodeDGSTLib.cli.options import add_device
from LymphNodeDGSTLib.adaptation.methods import DEFAULT_METHOD, METHOD_HELP, METHODS
from LymphNodeDGSTLib.adaptation.schedule import (BUDGET_HELP, DEFAULT_CHECK_EVERY, DEFAULT_MAX_ITERATIONS,
                                                  DEFAULT_PATIENCE, DEFAULT_PROBE_ITERATIONS,
                                                  DEFAULT_RATES, FIXED_ITERATIONS,
                                                  FIXED_ITERATIONS_PER_EPOCH, SCHEDULES)
from LymphNodeDGSTLib.errors import EXIT_OK
from LymphNodeDGSTLib.home import Home

COMMAND = "adapt"


def register(commands: argparse._SubParsersAction) -> None:
    adapt = commands.add_parser("adapt", help="fine-tune the model on the case library (background job)")
    adapt.add_argument("--model", help="NAME (its active version is the parent; default: the only model)")
    adapt.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help=METHOD_HELP)
    adapt.add_argument("--selection-only", action="store_true",
                       help="sparse methods: freeze norms, biases and head too, so only the selected "
                            "convolution entries move (an ablation)")
    adapt.add_argument("--gamma", type=int, default=2, help="entries updated per kernel and iteration")
    adapt.add_argument("--schedule", choices=SCHEDULES, default=None,
                       help="auto (default): choose the learning rate on held-out cases, stop when "
                            "their Dice stops improving, keep the best checkpoint; fixed: "
                            "--iterations at --lr. --iterations, --lr or --iterations-per-epoch "
                            "alone mean fixed")
    fixed = adapt.add_argument_group("fixed schedule")
    fixed.add_argument("--iterations", type=int, default=None,
                       help=f"training iterations (default {FIXED_ITERATIONS})")
    fixed.add_argument("--iterations-per-epoch", type=int, default=None,
                       help=f"iterations between pseudo-Dice checks (default {FIXED_ITERATIONS_PER_EPOCH})")
    fixed.add_argument("--lr", type=float, default=None, help="learning rate (default: per method)")
    auto = adapt.add_argument_group("automatic schedule")
    auto.add_argument("--budget", default=None,
                      help=f"{BUDGET_HELP}: rate probes and training stop when it is spent and the "
                           "best checkpoint so far is published (nothing, if none was scored yet)")
    auto.add_argument("--rates", default=None,
                      help="learning rates to probe, comma-separated (default "
                           + ",".join(f"{r:g}" for r in DEFAULT_RATES) + ")")
    auto.add_argument("--probe-iterations", type=int, default=None,
                      help=f"iterations of each rate probe (default {DEFAULT_PROBE_ITERATIONS})")
    auto.add_argument("--check-every", type=int, default=None,
                      help=f"iterations between held-out checks (default {DEFAULT_CHECK_EVERY})")
    auto.add_argument("--patience", type=int, default=None,
                      help=f"stop after this many checks without improvement (default {DEFAULT_PATIENCE})")
    auto.add_argument("--max-iterations", type=int, default=None,
                      help=f"the most iterations training may run (default {DEFAULT_MAX_ITERATIONS})")
    adapt.add_argument("--l2-to-foundation", type=float, default=0.0,
                       help="penalty tying the weights to the parent's (default 0)")
    adapt.add_argument("--holdout", type=int, default=None,
                       help="cases held out for evaluation (default: a quarter, at least 1 from 3 cases)")
    adapt.add_argument("--seed", type=int, default=0)
    add_device(adapt)
    adapt.add_argument("--nproc", type=int, default=1,
                       help="train on N processes with torchrun (DDP; one per GPU, or gloo on the CPU)")
    adapt.add_argument("--wait", action="store_true", help="follow the job to its end with a progress bar")
    activation = adapt.add_mutually_exclusive_group()
    activation.add_argument("--no-activate", action="store_true",
                            help="publish the adapted version without activating it")
    activation.add_argument("--force-activate", action="store_true",
                            help="activate it even if it fails the held-out gate (worse than its parent)")
    adapt.add_argument("--accurate-eval", action="store_true",
                       help="evaluate with mirroring (as 'segment' without --fast; slower)")


def handle(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest, check_request
    from LymphNodeDGSTLib.adaptation.schedule import parse_rates
    from LymphNodeDGSTLib.engine.segmentation.devices import choose_device
    from LymphNodeDGSTLib.jobs.manager import JobManager
    from LymphNodeDGSTLib.jobs.follow import follow_job

    request = AdaptRequest(
        model=args.model, method=args.method, gamma=args.gamma, schedule=args.schedule,
        iterations=args.iterations, iterations_per_epoch=args.iterations_per_epoch,
        budget=args.budget, rates=list(parse_rates(args.rates)) if args.rates is not None else None,
        probe_iterations=args.probe_iterations, check_every=args.check_every,
        patience=args.patience, max_iterations=args.max_iterations, device=args.device,
        activation="never" if args.no_activate else "force" if args.force_activate else "auto",
        learning_rate=args.lr, foundation_l2=args.l2_to_foundation, seed=args.seed,
        holdout=args.holdout, evaluate_fast=not args.accurate_eval, nproc=args.nproc,
        selection_only=args.selection_only)
    parent, split = check_request(home, request)
    request.model = parent.ref
    device = str(choose_device(args.device))
    manager = JobManager(home.jobs)
    job = manager.submit("adapt", {"home": str(home.root), "request": asdict(request)},
                         device=device, exclusive_device=True)
    print(job.id, flush=True)
    if not args.wait:
        return EXIT_OK
    status = follow_job(manager, job.id)
    final = manager.get(job.id)
    if final.result:
        print(json.dumps(final.result, indent=2))
    return status

