"""The shipped workflows in the real ComfyUI front end, in a real browser.

A second test host serves the pinned front end (comfyui-frontend-package 1.32.9, the version
ComfyUI 0.3.75 asks for) and Debian's chromium, driven by Playwright (from PyPI; never
`playwright install`: it would download a browser of its own), opens each workflows/*.json the
way a user drops it on the canvas, and checks:

* no missing node types, no dialog of any kind (missing nodes, missing models, errors), no error
  toast and no uncaught page error;
* every widget value as shipped after the front end configured the graph;
* the front end's own graphToPrompt equals the pack's converter (scripts/comfy_host.py
  workflow_to_api), which every other e2e test relies on;
* a screenshot per workflow in test-artifacts/browser/ (gitignored).

And: with empty model folders the missing-models dialog lists the files a workflow carries (its
properties.models); one workflow is queued through the Run button and its image reaches the
history and the page.

Every request the page makes off loopback is aborted: nothing leaves the machine. chromium,
playwright and the front-end package are installed by scripts/test.sh; when one is missing these
tests FAIL, unless PIXART_SKIP_BROWSER_TESTS=1 opts out (local runs only).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

import comfy_host
import controlnet_model_fixtures as cfx

pytestmark = pytest.mark.e2e

REPO = comfy_host.REPO
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
ARTIFACTS = REPO / "test-artifacts" / "browser"
FRONTEND_VERSION = "1.32.9"
CHROMIUM = os.environ.get("PIXART_CHROMIUM", "/usr/bin/chromium")
# As root, in a closed network: no sandbox, no GPU, and none of chromium's own calls home.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OPT_OUT = "PIXART_SKIP_BROWSER_TESTS"
# The front end asks the node registry (api.comfy.org) about the packs a workflow names; ComfyUI's
# Content Security Policy blocks that here, and the console says so: the only error we let pass.
OFF_MACHINE = re.compile(r"Connecting to 'https?://(?!127\.0\.0\.1)[^']*' violates the following Content Security")


def _frontend_root() -> Path:
    """The pinned front end's static folder; fails (or skips, when opted out) if anything is missing."""
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"browser tests skipped: {OPT_OUT}=1")
    hint = f"bash scripts/test.sh installs it (or set {OPT_OUT}=1 to skip the browser tests)"
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"browser tests need Debian's chromium at {CHROMIUM}: {hint}", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
        from importlib.metadata import version
        import comfyui_frontend_package
    except ImportError as e:
        pytest.fail(f"browser tests need {e.name} (requirements-dev.txt): {hint}", pytrace=False)
    if version("comfyui-frontend-package") != FRONTEND_VERSION:
        pytest.fail(f"browser tests need comfyui-frontend-package=={FRONTEND_VERSION}, found "
                    f"{version('comfyui-frontend-package')}: {hint}", pytrace=False)
    return Path(comfyui_frontend_package.__file__).parent / "static"


@pytest.fixture(scope="module")
def ui_host(comfy_host_dir, comfy_base, tmp_path_factory):
    """A host with the real front end, the e2e models linked in, and a user who has seen the tour."""
    root = _frontend_root()
    base = tmp_path_factory.mktemp("ui_base")
    comfy_host.link_models(comfy_base / "models", base / "models")
    (base / "input").mkdir(parents=True, exist_ok=True)
    shutil.copy(comfy_host_dir / "input" / "example.png", base / "input" / "example.png")  # img2img's picture
    cfx.write_hed_map(base / "input" / cfx.HED_MAP)  # controlnet_hed_alpha's hint
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))  # no template browser on first start
    host = comfy_host.ComfyHost(base, comfy_dir=comfy_host_dir, extra_args=["--front-end-root", str(root)])
    host.start()
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="module")
def ui_object_info(ui_host) -> dict:
    return ui_host.object_info()


class Page:
    """One browser tab on the host, with what went wrong in it since the last ``reset``."""

    def __init__(self, page, host):
        self.page, self.host = page, host
        self.errors: list[str] = []  # uncaught exceptions and console errors
        self.requests: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and not OFF_MACHINE.search(m.text)
                and self.errors.append(f"console: {m.text}"))
        page.on("request", lambda r: self.requests.append(r.url))

    def reset(self) -> None:
        self.errors.clear()
        self.requests.clear()

    def drop(self, path: Path) -> dict:
        """Drop a workflow file on the canvas, as a user would; returns the JSON dropped."""
        text = path.read_text(encoding="utf-8")
        wf = json.loads(text)
        loads = self.page.evaluate("() => window.__graphsConfigured")
        self.page.evaluate("""([text, name]) => {
            const data = new DataTransfer();
            data.items.add(new File([text], name, {type: 'application/json'}));
            document.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
        }""", [text, path.name])
        self.page.wait_for_function("(n) => window.__graphsConfigured > n", arg=loads, timeout=30_000)
        self.page.wait_for_timeout(500)  # let dialogs and previews settle
        return wf

    def dialogs(self) -> list[str]:
        return [t.strip() for t in self.page.locator(".p-dialog:visible").all_inner_texts()]

    def error_toasts(self) -> list[str]:
        return self.page.locator(".p-toast-message-error:visible").all_inner_texts()


@pytest.fixture(scope="module")
def browser_page(ui_host):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        context.route(re.compile(r"^(?!https?://127\.0\.0\.1[:/])"), lambda route: route.abort())
        page = Page(context.new_page(), ui_host)
        page.page.goto(ui_host.url)
        page.page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=60_000)
        # counts finished loads (the front end calls afterConfigureGraph once a graph is configured)
        page.page.evaluate("""() => { window.__graphsConfigured = 0;
            window.app.registerExtension({name: 'pixart.tests.loads',
                                          afterConfigureGraph() { window.__graphsConfigured += 1; }}); }""")
        page.page.wait_for_timeout(500)
        try:
            yield page
        finally:
            browser.close()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_opens_cleanly_in_the_frontend(browser_page, ui_object_info, path):
    page = browser_page
    page.reset()
    wf = page.drop(path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{path.stem}.png"
    page.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000  # a rendered canvas, not a blank page

    missing = page.page.evaluate("(types) => types.filter(t => !(t in window.LiteGraph.registered_node_types))",
                                 sorted({n["type"] for n in wf["nodes"]}))
    assert missing == []
    assert page.dialogs() == [] and page.error_toasts() == []
    assert page.errors == []

    graph = page.page.evaluate("() => window.app.graph.serialize()")
    loaded = {n["id"]: n.get("widgets_values") for n in graph["nodes"]}
    changed = {f"{n['id']} {n['type']}": (n.get("widgets_values"), loaded[n["id"]])
               for n in wf["nodes"] if n.get("widgets_values") != loaded[n["id"]]}
    assert changed == {}

    prompt = page.page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert prompt == comfy_host.workflow_to_api(wf, ui_object_info)


def test_missing_models_dialog_lists_the_workflows_files(browser_page):
    """A user without the models who opens a workflow is shown every file it needs, with its folder
    and source, at once (the front end reads node properties.models)."""
    page = browser_page.page
    empty = lambda route: route.fulfill(status=200, content_type="application/json", body="[]")  # noqa: E731
    page.route(re.compile(r"/api/experiment/models/[^/?]+$"), empty)  # every model folder looks empty
    try:
        browser_page.reset()
        browser_page.drop(REPO / "workflows" / "txt2img_1024.json")
        dialog = page.locator(".p-dialog:visible")
        dialog.wait_for(timeout=10_000)
        page.wait_for_timeout(500)
        text = dialog.inner_text()
        page.screenshot(path=str(ARTIFACTS / "missing_models_dialog.png"))
        assert "diffusion_models / PixArt-Sigma-XL-2-1024-MS.pth" in text
        assert "text_encoders / t5xxl_fp16.safetensors" in text and "vae / sdxl_vae.safetensors" in text
        # the front end offers downloads only of .safetensors/.sft files: the .pth is listed with its
        # folder and this note, and `python -m pixart_core download` fetches it
        assert text.count("Only allowed suffixes are") == 1
        buttons = dialog.get_by_role("button", name=re.compile("Download"))
        assert [b.is_enabled() for b in buttons.all()] == [False, True, True]
        urls = [b.get_attribute("title") for b in buttons.all()]  # each button's link
        assert urls == [f"https://huggingface.co/{repo}/resolve/main/{name}" for repo, name in (
            ("PixArt-alpha/PixArt-Sigma", "PixArt-Sigma-XL-2-1024-MS.pth"),
            ("comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors"),
            ("stabilityai/sdxl-vae", "sdxl_vae.safetensors"))]
        page.keyboard.press("Escape")
        dialog.wait_for(state="hidden", timeout=5_000)
    finally:
        page.unroute(re.compile(r"/api/experiment/models/[^/?]+$"))


def test_run_button_queues_and_the_image_appears(browser_page, ui_host):
    page = browser_page.page
    browser_page.reset()
    wf = browser_page.drop(REPO / "workflows" / "txt2img_1024.json")
    assert browser_page.dialogs() == []
    before = set(ui_host.history())
    # what a user does in the widgets: the smallest size class and one step, to keep the test short
    page.evaluate("""() => {
        for (const node of window.app.graph.nodes) {
            for (const w of node.widgets || []) {
                if (w.name === 'steps') w.value = 1;
                if (w.name === 'size_class') w.value = '256';
            }
        }
    }""")
    page.locator('[data-testid="queue-button"] button').first.click()
    deadline, entry = time.monotonic() + 180, None
    while time.monotonic() < deadline and entry is None:
        new = [pid for pid in ui_host.history() if pid not in before]
        if new:
            entry = ui_host.wait(new[0], timeout=max(1.0, deadline - time.monotonic()))
        else:
            time.sleep(0.25)
    assert entry is not None, "the Run button queued nothing"
    images = ui_host.output_images(entry)
    assert len(images) == 1 and images[0].name.startswith("PixArt-Sigma_1024") and images[0].stat().st_size > 0
    prompt, extra = entry["prompt"][2], entry["prompt"][3]
    assert prompt[str(next(n["id"] for n in wf["nodes"] if n["type"] == "PixArtSuiteSampler"))]["inputs"]["steps"] == 1
    assert extra["extra_pnginfo"]["workflow"]["nodes"]  # the canvas embeds the workflow, as for any user
    deadline = time.monotonic() + 30
    while not [u for u in browser_page.requests if "/view?" in u and images[0].name in u]:
        assert time.monotonic() < deadline, f"the page never showed {images[0].name}: " + repr(
            [u for u in browser_page.requests if "view" in u or "history" in u])
        page.wait_for_timeout(250)
    page.screenshot(path=str(ARTIFACTS / "run_result.png"))
    assert browser_page.errors == [] and browser_page.error_toasts() == []
