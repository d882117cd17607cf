"""A TopK SAE on SmolLM2's middle residual stream: the figures of docs/sae.md.

    python scripts/bench_sae.py [--server HOST:PORT] [--dir /tmp/lmscope-bench-sae] [--layer 15]
                                [--features 4608] [--k 32] [--epochs 8] [--heldout 48] [--threads 1]
                                [--json out.json] [--save DIR]

1. Collect: the Python Language Reference topics (`lmscope.client.corpus`, in every Python installation)
   cut into ~470-character passages, every token's ``blocks.L.resid_post`` (float16) into an activation
   store; the last --heldout passages are held out.
2. Fit: `Client.fit_sae` on the other passages' tokens (BOS rows left out), timed; checkpoints go to the
   store directory, so a run killed during the fit resumes there (the store's collect resumes too).
3. Measure: FVE, L0 and dead features on the training tokens and on the held-out tokens; then, on the
   held-out passages, next-token cross-entropy clean, with the site replaced by the SAE's reconstruction,
   by zeros and by the mean activation (`Client.sae_loss_recovered`, SET interventions in the server).

The load average before and after each phase is printed: the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

from _server import connect

from lmscope.client.corpus import NAME, corpus_digest, python_reference
from lmscope.client.sae_analysis import store_rows


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server")
    parser.add_argument("--dir", default="/tmp/lmscope-bench-sae")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--features", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--heldout", type=int, default=48, help="passages held out for the measurements")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads while fitting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--save", help="write the SAE here (SAELens layout)")
    args = parser.parse_args()

    site = f"blocks.{args.layer}.resid_post"
    passages = python_reference()
    directory = pathlib.Path(args.dir)
    results: dict = {"corpus": NAME, "corpus_sha256": corpus_digest(), "passages": len(passages), "site": site}
    with connect(args.server) as c:
        info = c.model_info()
        results["model"] = info.name
        print(f"{info.name}: {site}; corpus {NAME} ({corpus_digest()[:12]}), {len(passages)} passages; {load()}")
        started = time.perf_counter()
        store = c.collect(passages, directory / "store", sites=[site], positions=None, dtype="float16")
        results["collect_seconds"] = round(time.perf_counter() - started, 1)
        print(f"store: {len(store)} passages, {store.n_tokens} tokens ({store.stats.computed} computed now) in "
              f"{results['collect_seconds']} s; {load()}")

        train = slice(0, len(store) - args.heldout)
        rows, _ = store_rows(store, site, train)
        results["training_tokens"] = len(rows)
        started, cpu_started = time.perf_counter(), time.process_time()
        sae = c.fit_sae(store, site, n_features=args.features, k=args.k, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, prompts=train,
                        checkpoint=directory / f"fit-{args.features}-{args.k}-{args.epochs}-{args.seed}.npz",
                        threads=args.threads)
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started  # this process only: the load of others is not in it
        steps = sae.info["steps"]
        fitted_seconds = sae.info["fit_seconds_this_run"]
        token_steps = steps * args.batch_size
        results.update(fit_seconds=round(seconds, 1), fit_cpu_seconds=round(cpu_seconds, 1), steps=steps,
                       token_steps=token_steps,
                       seconds_per_10k_token_steps=round(10_000 * fitted_seconds / token_steps, 3),
                       settings=sae.info["settings"])
        print(f"fit: {args.features} features, k={args.k}, {args.epochs} epochs over {len(rows)} tokens = {steps} "
              f"steps of {args.batch_size}: {seconds:.1f} s ({results['seconds_per_10k_token_steps']} s per 10k "
              f"token-steps, {10_000 * seconds / len(rows):.2f} s per 10k training tokens; {cpu_seconds:.1f} s of "
              f"CPU in this process); {load()}")

        train_scores = sae.evaluate(rows)
        heldout_rows, _ = store_rows(store, site, slice(len(store) - args.heldout, len(store)))
        heldout_scores = sae.evaluate(heldout_rows)
        results["train"] = vars(train_scores)
        results["heldout"] = vars(heldout_scores)
        print(f"training tokens: FVE {train_scores.fve:.4f}, L0 {train_scores.l0:.2f}, dead "
              f"{train_scores.dead_fraction:.2%}")
        print(f"held-out tokens: FVE {heldout_scores.fve:.4f}, L0 {heldout_scores.l0:.2f}")

        heldout = passages[len(store) - args.heldout:len(store)]
        started = time.perf_counter()
        evaluation = c.sae_loss_recovered(sae, heldout)
        results["loss"] = {"ce_clean": evaluation.ce_clean, "ce_sae": evaluation.ce_sae,
                           "ce_zero": evaluation.ce_zero, "ce_mean": evaluation.ce_mean,
                           "recovered_zero": evaluation.recovered_zero, "recovered_mean": evaluation.recovered_mean,
                           "predictions": evaluation.n_predictions,
                           "seconds": round(time.perf_counter() - started, 1)}
        print(evaluation)
        print(load())
        if args.save:
            sae.save(args.save)
            print(f"saved {args.save}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
