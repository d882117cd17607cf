"""The HTML views (lmscope.client.views) of real results from the tiny model, in a real headless Chromium.

Every view: `_repr_html_` is the fragment `to_html` writes, the page references nothing outside itself,
it loads without console messages and without a single request besides the file itself, and hovering a
cell with the mouse shows the values the result object holds. The browser is the system's chromium and
chromedriver (scripts/setup.sh installs them as root); without them the browser tests skip and say why.

Tolerances: the views write floats with 4 significant digits (relative error <= 5e-4) and attention
probabilities as integers of 1e-4 (absolute error <= 5e-5); the read-outs show what the data holds.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tolerances import SAME_KERNELS

from lmscope.client.activation_patching import logit_difference
from lmscope.client.token_labels import token_labels
from lmscope.client.views import browser

PROMPT = "The cat sat on the mat.\n兩顆青蘋果 and a dog"
SIG4 = 5e-4  # relative error of 4 significant digits


@pytest.fixture(scope="module")
def lens(client):
    return client.logit_lens(PROMPT, top_k=4, targets=[" cat", "兩"])


@pytest.fixture(scope="module")
def attention(client):
    return client.attention(PROMPT, layers=[1, 3])


@pytest.fixture(scope="module")
def neurons(client):
    return client.neuron_activations([PROMPT, "A second prompt"], layer=2, neurons=[5, 17, 100], k=4)


@pytest.fixture(scope="module")
def sweep(client):
    clean = client.tokenize("The cat sat on the mat").token_ids
    corrupted = list(clean)
    corrupted[3] = client.token_id(" blue")
    return client.patch_sweep(clean, corrupted, metric=logit_difference(5, 6), layers=[0, 1, 3])


@pytest.fixture(scope="module")
def pages(tmp_path_factory, lens, attention, neurons, sweep):
    folder = tmp_path_factory.mktemp("views")
    results = {"lens": lens, "attention": attention, "neurons": neurons, "patch": sweep}
    for name, result in results.items():
        result.to_html(folder / f"{name}.html")
    return {name: folder / f"{name}.html" for name in results}


def shown(label: str) -> str:
    """What a grid or list shows for a token label (views.js `shown`)."""
    if label == "":
        return "∅"
    return label.replace("\\n", "↵").replace("\\t", "⇥").replace("\\r", "␍").replace(" ", "␣")


def data_of(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" class="lmv-data">(.*?)</script>', page, re.S)[1])


def close(text: str, value: float, relative: float = SIG4, absolute: float = 0.0) -> bool:
    return abs(float(text) - value) <= relative * abs(value) + absolute + 1e-12


# ----- without a browser ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lens", "attention", "neurons", "patch"])
def test_repr_html_is_the_fragment_the_file_holds_and_it_needs_no_network(name, pages, lens, attention, neurons,
                                                                           sweep):
    result = {"lens": lens, "attention": attention, "neurons": neurons, "patch": sweep}[name]
    fragment = result._repr_html_()
    page = pages[name].read_text(encoding="utf-8")
    assert fragment in page and page.startswith("<!DOCTYPE html>")
    assert result._repr_html_() == fragment  # deterministic: the same result gives the same text
    for outside in ("http:", "https:", "<link", " src=", "@import", "url("):
        assert outside not in page, outside
    assert fragment.count("<script") == 2  # the data block and the renderer, both inline


def test_lens_data_holds_the_result_with_readable_tokens(client, lens):
    data = data_of(lens._repr_html_())
    n_states, n_positions, k = lens.top_ids.shape
    top = np.array(data["top"]).reshape(n_states, n_positions, k)
    ids = np.array(data["ids"])
    np.testing.assert_array_equal(ids[top], lens.top_ids)
    np.testing.assert_allclose(np.array(data["probs"]).reshape(lens.top_probs.shape), lens.top_probs, rtol=SIG4)
    np.testing.assert_allclose(np.array(data["entropy"]).reshape(lens.entropy.shape), lens.entropy, rtol=SIG4)
    # the byte pieces of one character are joined: 兩 is one or several tokens, never a replacement character
    assert "\ufffd" not in "".join(data["tokens"])
    assert data["tokens"] == [client.token_labels(lens.token_ids)[p] for p in lens.positions]
    for target in data["targets"]:
        trace = lens.targets[target["id"]]
        np.testing.assert_array_equal(np.array(target["ranks"]).reshape(trace.ranks.shape), trace.ranks)


def test_attention_data_is_the_causal_part_in_units_of_1e4(attention):
    data = data_of(attention._repr_html_())
    n = len(attention.tokens)
    rows, cols = np.tril_indices(n)
    lower = np.array(data["probs"]).reshape(len(attention.layers), len(attention.heads), -1) / data["scale"]
    np.testing.assert_allclose(lower, attention.probs[:, :, rows, cols], atol=0.5 / data["scale"] + 1e-7)
    assert np.all(attention.probs[:, :, cols, rows][:, :, rows != cols] == 0)  # what is left out is exactly 0


def test_neuron_activations_are_the_chosen_columns_of_the_capture(client, neurons):
    for prompt, tokens, acts in zip([PROMPT, "A second prompt"], neurons.tokens, neurons.activations):
        whole = client.neurons(prompt, layer=2)
        assert tokens == whole.tokens
        # a batch of two prompts (one ubatch of < 64 rows) against a run of one: the same kernels row by row
        # (tests/tolerances.py, SAME_KERNELS), as in test_foundation
        np.testing.assert_allclose(acts, whole.activations[:, [5, 17, 100]], rtol=SAME_KERNELS, atol=SAME_KERNELS)
    assert [p.neuron for p in neurons.projections] == [5, 17, 100]
    np.testing.assert_array_equal(neurons.projections[1].top_ids, client.neuron_top_tokens(2, 17, k=4).top_ids)


def test_cli_lens_html_writes_the_view_of_every_position(client, tiny_server, tmp_path, capsys):
    from lmscope.client.cli import main

    page = tmp_path / "lens.html"
    assert main(["lens", PROMPT, "--server", tiny_server.address, "--html", str(page)]) == 0
    data = data_of(page.read_text(encoding="utf-8"))
    n_tokens = len(client.tokenize(PROMPT).token_ids)
    assert data["positions"] == list(range(n_tokens)) and len(data["layers"]) == client.model_info().n_layer + 1
    assert f"position {n_tokens - 1}" in capsys.readouterr().out  # the table of the last position, as before


# ----- in the browser -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def driver():
    found = browser.find_chromium()
    if isinstance(found, str):
        pytest.skip(f"browser tests need the system's chromium: {found}")
    with browser.chromium(width=1400, height=1000) as d:
        d.get("about:blank")
        browser.console_messages(d), browser.requested_urls(d)  # what the browser did before any view
        yield d


def load(driver, path):
    """Open a view; assert it logged nothing and asked for nothing but its own file."""
    browser.open_page(driver, path)
    assert browser.console_messages(driver) == []
    assert browser.requested_urls(driver) == [path.resolve().as_uri()]


def hover(driver, selector):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.CSS_SELECTOR, selector)
    ActionChains(driver).move_to_element(element).perform()
    return element


def texts(driver, selector) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def test_lens_view_in_the_browser(driver, pages, lens, tmp_path):
    load(driver, pages["lens"])
    cells = texts(driver, "div.lmv .g .c")
    assert len(cells) == lens.top_ids.shape[0] * lens.top_ids.shape[1]
    labels = {t: token_labels([p])[0] for t, p in lens.token_pieces.items()}
    for i, j in [(2, 3), (0, 0), (lens.n_layer, len(lens.positions) - 1)]:
        hover(driver, f'div.lmv .g .c[data-i="{i}"][data-j="{j}"]')
        assert texts(driver, ".panel h4") == [f"layer {lens.layers[i]} · position {lens.positions[j]}"]
        tokens = [t.removesuffix(" ✓ next") for t in texts(driver, ".panel tr.topk td.t")]
        assert tokens == [shown(labels[int(t)]) for t in lens.top_ids[i, j]]
        for text, p in zip(texts(driver, ".panel tr.topk td.p"), lens.top_probs[i, j]):
            assert close(text, p)
        nxt = lens.next_token_ids[j]
        marked = [r for r, t in enumerate(lens.top_ids[i, j]) if t == nxt]
        assert [n for n, t in enumerate(texts(driver, ".panel tr.topk td.t")) if t.endswith("✓ next")] == marked
        for trace, p, rank in zip(lens.targets.values(), texts(driver, ".panel tr.target td.p"),
                                  texts(driver, ".panel tr.target td.r")):
            assert close(p, trace.probs[i, j]) and int(rank) == trace.ranks[i, j] + 1
    from selenium.webdriver.common.by import By

    framed = {(int(c.get_attribute("data-i")), int(c.get_attribute("data-j")))
              for c in driver.find_elements(By.CSS_SELECTOR, "div.lmv .g .c.hit")}
    assert framed == {(i, j) for i in range(lens.n_layer + 1) for j, nxt in enumerate(lens.next_token_ids)
                      if nxt is not None and lens.top_ids[i, j, 0] == nxt}
    browser.screenshot(driver, tmp_path / "lens.png")
    assert (tmp_path / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_view_in_the_browser(driver, pages, attention):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    load(driver, pages["attention"])
    assert len(driver.find_elements(By.CSS_SELECTOR, ".thumb canvas")) == len(attention.heads)
    Select(driver.find_element(By.CSS_SELECTOR, ".bar-row select")).select_by_visible_text("3")
    hover(driver, '.thumb[data-h="2"]')  # a head's small multiple: the large view follows the mouse
    assert texts(driver, ".thumb.sel span") == ["head 2"]
    pattern = attention.pattern(3, 2)
    n = len(attention.tokens)
    for q, k in [(n - 1, 0), (5, 4), (9, 9)]:
        hover(driver, f'.g .c[data-q="{q}"][data-k="{k}"]')
        assert close(texts(driver, ".panel td.cellp")[0], pattern[q, k], relative=0, absolute=5e-5)
    q = n - 1
    hover(driver, f'.strip .s[data-i="{q}"]')
    keys = [int(t) for t in texts(driver, ".panel tr.to td.r")]
    probs = [float(t) for t in texts(driver, ".panel tr.to td.p")]
    assert keys[0] == int(np.argmax(pattern[q])) and abs(probs[0] - pattern[q].max()) <= 5e-5
    np.testing.assert_allclose(probs, pattern[q, keys], atol=5e-5)
    assert probs == sorted(probs, reverse=True)
    senders = [int(t) for t in texts(driver, ".panel tr.from td.r")]
    np.testing.assert_allclose([float(t) for t in texts(driver, ".panel tr.from td.p")], pattern[senders, q], atol=5e-5)


def test_neuron_view_in_the_browser(driver, pages, neurons):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    load(driver, pages["neurons"])
    Select(driver.find_element(By.CSS_SELECTOR, ".bar-row select")).select_by_index(1)  # neuron 17
    for prompt, position in [(0, 3), (1, 2)]:
        hover(driver, f'.prompt .s[data-p="{prompt}"][data-i="{position}"]')
        assert texts(driver, ".panel h4") == [f"prompt {prompt} · position {position}"]
        assert close(texts(driver, ".panel td.act")[0], float(neurons.activations[prompt][position, 1]))
    promoted = texts(driver, ".side > table")[0]
    assert all(shown(t) in promoted for t in neurons.projections[1].top_tokens)


def test_patch_view_in_the_browser(driver, pages, sweep):
    load(driver, pages["patch"])
    normalized = sweep.normalized()
    for i, j in [(0, 3), (2, len(sweep.positions) - 1)]:
        hover(driver, f'.g .c[data-i="{i}"][data-j="{j}"]')
        assert close(texts(driver, ".panel td.value")[0], sweep.values[i, j])
        assert close(texts(driver, ".panel td.restored")[0], normalized[i, j])


def test_several_views_share_one_page_as_in_a_notebook(driver, tmp_path, lens, attention, neurons, sweep):
    """Fragments side by side (a notebook's outputs), the same result twice: each draws in its own box."""
    from selenium.webdriver.common.by import By

    from lmscope.client.views import write

    fragments = [r._repr_html_() for r in (lens, attention, neurons, sweep, lens)]
    page = tmp_path / "notebook.html"
    write("\n".join(fragments), "several views", page)
    load(driver, page)
    boxes = driver.find_elements(By.CSS_SELECTOR, "div.lmv")
    assert [b.get_attribute("data-kind") for b in boxes] == ["lens", "attention", "neurons", "patch", "lens"]
    assert all(b.find_elements(By.CSS_SELECTOR, ".panel") for b in boxes)  # every one drawn, the twin too
    hover(driver, 'div.lmv[data-kind="patch"] .g .c[data-i="1"][data-j="2"]')
    value = boxes[3].find_element(By.CSS_SELECTOR, ".panel td.value").text
    assert close(value, sweep.values[1, 2])


def test_views_draw_where_a_front_end_evaluates_their_scripts_out_of_place(driver, tmp_path, lens):
    """Classic Notebook inserts output HTML and evaluates its scripts with eval (no currentScript): the
    fragment then finds its own container by content hash, the first one not yet drawn, twins included."""
    from selenium.webdriver.common.by import By

    from lmscope.client.views import write

    page = tmp_path / "blank.html"
    write("", "blank", page)
    driver.get(page.resolve().as_uri())
    driver.execute_script("""
        for (const html of arguments[0]) {
          const box = document.createElement("div");
          box.innerHTML = html;                       // scripts inserted this way do not run ...
          document.body.appendChild(box);
          box.querySelectorAll("script:not([type])").forEach((s) => window.eval(s.textContent));  // ... eval does
        }""", [lens._repr_html_(), lens._repr_html_()])
    boxes = driver.find_elements(By.CSS_SELECTOR, "div.lmv")
    assert [b.get_attribute("data-rendered") for b in boxes] == ["1", "1"]
    assert all(b.find_elements(By.CSS_SELECTOR, ".g .c") for b in boxes)
    assert browser.console_messages(driver) == []
