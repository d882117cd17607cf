"""Screenshots of the four HTML views for the docs, and their sizes and render times at full scale.

    .venv/bin/python scripts/figures_views.py [--server HOST:PORT] [--out DIR]

Starts a server on the default model (SmolLM2-135M-Instruct, 30 layers, 9 heads) unless --server is given,
builds each view from a real result, opens it in headless chromium (lmscope.client.views.browser), hovers a
cell as a reader would, and writes docs/views/{lens,attention,neurons,patch}.png. Then measures a 30-layer x
64-token lens and a 9-head x 64-token attention view (one layer, and all 30 layers): file size, the time
to build the HTML in Python, and the time chromium takes to load and render it. The pages go to --out
(default: a temporary folder). Figures for docs/views.md.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

from lmscope.client import Client
from lmscope.client.views import browser

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "views"
LONG_TEXT = ("The logit lens reads each layer of a language model through its own unembedding. Early layers "
             "mostly echo the input token; the answer appears in the last third of the network, often first as "
             "a related word. Attention heads move information between positions: a previous-token head looks "
             "one step back, an induction head finds an earlier copy of the current token and predicts what "
             "followed it. 今天天氣真好，我們去公園散步吧。")


def hover(driver, selector: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ActionChains(driver).move_to_element(driver.find_element(By.CSS_SELECTOR, selector)).perform()


def picture(driver, page: pathlib.Path, png: pathlib.Path, selector: str | None = None) -> None:
    browser.open_page(driver, page)
    if selector:
        hover(driver, selector)
    browser.screenshot(driver, png)
    driver.set_window_size(1400, 1000)
    print(f"wrote {png.relative_to(ROOT)}")


def measure(driver, name: str, build, page: pathlib.Path, repeats: int = 3) -> str:
    """Build the page `repeats` times (median seconds), load it as many times, and report its size."""
    build_s, load_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        build(page)
        build_s.append(time.perf_counter() - start)
        browser.open_page(driver, page)
        # The scripts are inline and synchronous: the view is drawn before the load event ends.
        load_s.append(driver.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd") / 1e3)
    size = page.stat().st_size
    return (f"| {name} | {size / 1024:.0f} KB | {statistics.median(build_s) * 1e3:.0f} ms | "
            f"{statistics.median(load_s) * 1e3:.0f} ms |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("LMSCOPE_SERVER"))
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for the HTML pages")
    args = parser.parse_args()
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="lmscope-views-"))
    out.mkdir(parents=True, exist_ok=True)
    DOCS.mkdir(parents=True, exist_ok=True)
    server = None
    if not args.server:
        from lmscope.service.launch import launch_server

        server = launch_server(args=("--n-ctx", "2048"))
        args.server = server.address
    try:
        with Client(args.server) as c, browser.chromium(width=1400, height=1000) as driver:
            info = c.model_info()
            # --- the pictures -------------------------------------------------------------------------
            lens = c.logit_lens("The capital of France is Paris. The capital of Germany is", top_k=5,
                                targets=[" Berlin", " Paris"])
            lens.to_html(out / "lens.html")
            picture(driver, out / "lens.html", DOCS / "lens.png",
                    f'.g .c[data-i="{info.n_layer - 3}"][data-j="{len(lens.positions) - 1}"]')

            sentence = "The cat sat on the mat because it was tired, and the cat slept."
            attention = c.attention(sentence, layers=[1, 11, 16])
            attention.to_html(out / "attention.html", layer=16, head=0)
            picture(driver, out / "attention.html", DOCS / "attention.png", '.strip .s[data-i="12"]')

            prompts = ["The cat sat on the mat because it was tired.", "Paris is the capital of France.",
                       "def add(a, b):\n    return a + b", "今天天氣真好！"]
            layer = 20
            strongest = [int(c.neurons(p, layer).top(-1, k=1)[0][0]) for p in prompts[:2]]
            neurons = c.neuron_activations(prompts, layer, list(dict.fromkeys(strongest)), k=8)
            neurons.to_html(out / "neurons.html")
            picture(driver, out / "neurons.html", DOCS / "neurons.png")

            sweep = c.patch_sweep("The capital of France is", "The capital of Italy is")
            sweep.to_html(out / "patch.html", normalized=True)
            picture(driver, out / "patch.html", DOCS / "patch.png")

            # --- size and time at full scale ----------------------------------------------------------
            ids = c.tokenize(LONG_TEXT).token_ids[:64]
            if len(ids) < 64:
                sys.exit(f"LONG_TEXT has only {len(ids)} tokens; make it longer")
            big_lens = c.logit_lens(ids, top_k=5)
            one_layer = c.attention(ids, layers=[16])
            all_layers = c.attention(ids)
            rows = [
                measure(driver, f"logit lens, {info.n_layer + 1} hidden states x 64 positions, top-5", big_lens.to_html,
                        out / "lens64.html"),
                measure(driver, f"attention, 1 layer x {info.n_head} heads x 64 tokens", one_layer.to_html,
                        out / "attention64.html"),
                measure(driver, f"attention, {info.n_layer} layers x {info.n_head} heads x 64 tokens", all_layers.to_html,
                        out / "attention64_all.html"),
                measure(driver, "neurons (above)", neurons.to_html, out / "neurons.html"),
                measure(driver, f"patch sweep, {len(sweep.layers)} layers x {len(sweep.positions)} positions",
                        sweep.to_html, out / "patch.html"),
            ]
            load = os.getloadavg()
            print(f"\n{info.name}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; pages in {out}\n")
            print("| view | file | build (Python) | load + draw (chromium, to the load event) |\n| --- | --- | --- | --- |")
            print("\n".join(rows))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
