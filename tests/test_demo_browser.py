"""The demo page (app.py) driven end to end in headless Chromium: enroll a speaker, classify a clip,
label a long recording (segments, timeline plot, summary, CSV download).

Needs the [demo] extra (gradio), selenium ([dev]) and Debian's chromium + chromium-driver (`.ci/run`
installs them); skips cleanly without any of them. Serves on 127.0.0.1 only; about 20-40 s.
"""

import shutil
import socket

import numpy as np
import pytest

pytestmark = pytest.mark.browser

gr = pytest.importorskip("gradio")
pytest.importorskip("selenium")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("no chromium/chromedriver installed (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SR = 16000
LABELS = ["joy", "gloom", "fury"]  # label words the tiny model never saw


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import soundfile

    import app
    from modeling_icl_ser import save_with_pipeline
    from modeling_icl_ser.testing import tiny_icl_ser

    root = tmp_path_factory.mktemp("demo")
    model, processor = tiny_icl_ser(seed=1, context_readout_heads=2)
    save_with_pipeline(model, processor, root / "model")
    clips = []
    for i, freq in enumerate([170, 240, 330, 410]):
        t = np.arange(int(1.2 * SR)) / SR
        path = root / f"clip{i}.wav"
        soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(6 * t))).astype(np.float32), SR)
        clips.append(str(path))
    from modeling_icl_ser.testing import synthetic_speech

    silence = np.zeros(SR, np.float32)
    long = np.concatenate([silence, synthetic_speech(2.0, 1), silence, synthetic_speech(1.5, 2, pitch=180), silence,
                           synthetic_speech(2.5, 3), silence])
    soundfile.write(root / "call.wav", long, SR)
    clips.append(str(root / "call.wav"))
    demo = app.build_demo(str(root / "model"))
    port = _free_port()
    _, url, _ = app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    assert url.startswith("http://127.0.0.1:")
    yield url, clips
    demo.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def _text(driver, elem_id):
    return driver.find_element(By.ID, elem_id).text


def _upload(driver, wait, elem_id, path):
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(path)
    wait.until(lambda d: "Drop Audio Here" not in _text(d, elem_id))  # the player replaced the drop zone


def test_enroll_and_classify_in_the_browser(served, browser):
    url, clips = served
    wait = WebDriverWait(browser, 30)
    browser.get(url)
    wait.until(lambda d: "Model loaded" in _text(d, "model_status"))

    # A polite refusal first: enrolling nobody.
    browser.find_element(By.ID, "enroll").click()
    wait.until(lambda d: "Add at least one clip" in d.find_element(By.TAG_NAME, "body").text)

    for i, (clip, label) in enumerate(zip(clips, LABELS)):
        _upload(browser, wait, "enroll_audio", clip)
        box = browser.find_element(By.CSS_SELECTOR, "#enroll_label textarea, #enroll_label input")
        box.clear()
        box.send_keys(label)
        browser.find_element(By.ID, "add_clip").click()
        wait.until(lambda d: label in _text(d, "enroll_table") and "Drop Audio Here" in _text(d, "enroll_audio"))
    browser.find_element(By.CSS_SELECTOR, "#candidates textarea, #candidates input").send_keys(", ".join(LABELS))
    browser.find_element(By.ID, "enroll").click()
    wait.until(lambda d: "Enrolled 3 clips" in _text(d, "enroll_status"))

    _upload(browser, wait, "query_audio", clips[3])
    browser.find_element(By.ID, "classify").click()
    wait.until(lambda d: any(label in _text(d, "result") for label in LABELS))
    shown = _text(browser, "result")
    lines = [line.strip() for line in shown.split("\n") if line.strip() and line.strip() != "Emotion"]
    top, rest = lines[0], lines[1:]  # the heading (best label), then a label / percentage pair per bar
    bars = dict(zip(rest[0::2], (float(p.rstrip("%")) for p in rest[1::2])))
    assert set(bars) == set(LABELS), shown  # exactly the enrolled candidates, never the model's vocabulary
    assert top in LABELS and bars[top] == max(bars.values()), shown
    assert abs(sum(bars.values()) - 100) <= 2, shown  # rounded probabilities


def test_long_recording_tab_shows_segments_plot_and_csv(served, browser):
    url, clips = served
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    wait.until(lambda d: "Model loaded" in _text(d, "model_status"))
    next(tab for tab in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "long recording" in tab.text).click()
    _upload(browser, wait, "long_audio", clips[4])
    browser.find_element(By.ID, "timeline").click()
    wait.until(lambda d: "segments" in _text(d, "timeline_summary"))
    assert _text(browser, "timeline_summary").startswith("3 segments"), _text(browser, "timeline_summary")
    table = _text(browser, "segments_table")
    assert "start (s)" in table and "speaker" in table
    numbers = []
    for line in table.split("\n"):
        try:
            numbers.append(float(line))
        except ValueError:
            pass
    assert len(numbers) == 9, table  # start, end and score of 3 segments
    assert abs(numbers[0] - 1.0) < 0.25 and numbers[1] < numbers[3], table  # the first utterance starts after 1 s
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#timeline_plot img, #timeline_plot svg, #timeline_plot canvas"))
    link = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#segments_csv a"))[0]
    assert link.get_attribute("href") and "segments.csv" in link.text + link.get_attribute("href")
