"""mlx_kvq.assistant's chat page in headless Chromium (Debian's chromium and
chromium-driver, driven by selenium; nothing is downloaded): conversations,
a document upload, a streamed reply and the memory panel."""

import re
import shutil
from pathlib import Path

import pytest

from test_assistant import Assistant

from mlx_kvq.commands.corpus import sample_text

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "assistant.png"
# ~400 tokens: long enough that most of the cache is quantized.
DOCUMENT = ("# Kerrin Island\n\nThe lighthouse on Kerrin Island is painted green. "
            "It was built in 1871 and its keeper is called Maud.\n\n" + sample_text()[:1500])


@pytest.fixture
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install the Debian packages chromium "
                    "and chromium-driver (setup.sh does)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1400,800",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def server(tmp_path):
    s = Assistant(tmp_path / "data", "--max-tokens", "16", log_file=tmp_path / "server.log")
    yield s
    s.stop()


def test_chat_page(server, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def el(id_):
        return browser.find_element(By.ID, id_)

    def text(id_):
        return el(id_).text

    def titles():
        return [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#conv-list li")]

    wait = WebDriverWait(browser, 120, poll_frequency=0.05,  # the page re-renders lists
                         ignored_exceptions=(StaleElementReferenceException,))
    browser.get(server.url)
    wait.until(lambda _: "k4v4" in text("server-info"))

    # A conversation, renamed.
    el("new-conv").click()
    wait.until(lambda _: text("conv-id"))
    el("rename").click()
    el("title-input").send_keys("Lighthouse notes", Keys.ENTER)
    wait.until(lambda _: text("title") == "Lighthouse notes")
    wait.until(lambda _: titles() == ["Lighthouse notes"])

    # A document, uploaded as a .md file and prefilled into the cache.
    doc = tmp_path / "kerrin.md"
    doc.write_text(DOCUMENT)
    el("add-doc").click()
    el("doc-file").send_keys(str(doc))
    wait.until(lambda _: el("doc-name").get_attribute("value") == "kerrin.md")
    assert "Maud" in el("doc-text").get_attribute("value")
    el("doc-submit").click()
    wait.until(lambda _: "prompt tokens were cached" in text("status"))
    doc_tokens = int(text("mem-tokens").replace(",", ""))
    assert doc_tokens > 300
    assert "kerrin.md" in browser.find_element(By.CSS_SELECTOR, ".msg.document").text

    # A question: the reply streams in, then the memory panel grows.
    el("prompt").send_keys("What color is the lighthouse?")
    el("send").click()
    wait.until(lambda _: any(e.text for e in browser.find_elements(
        By.CSS_SELECTOR, ".msg.assistant.streaming")))  # partial text, still streaming
    wait.until(lambda _: "generated" in text("status"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".streaming")
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text
    assert reply
    assert f"{doc_tokens} prompt tokens were cached" in text("status")
    assert int(text("mem-tokens").replace(",", "")) > doc_tokens
    assert text("mem-bytes").endswith("MiB")
    ratio = float(re.search(r"\(([\d.]+)× the cache\)", text("mem-fp16")).group(1))
    assert ratio > 1.5  # quantized
    assert "of" in text("mem-left") and text("mem-where") == "in memory"
    assert text("mem-scheme").startswith("k4v4-g32-r64-s4: K 4-bit per-channel")
    assert not el("mem-ranks").is_displayed()  # one process: no per-rank rows

    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(tmp_path / "assistant.png"))
    shutil.copy(tmp_path / "assistant.png", SCREENSHOT)
    print(f"screenshot: {SCREENSHOT}")

    # Another conversation, deleted.
    el("new-conv").click()
    wait.until(lambda _: len(titles()) == 2)
    el("delete").click()
    browser.switch_to.alert.accept()
    wait.until(lambda _: titles() == ["Lighthouse notes"])
    wait.until(lambda _: text("title") == "Lighthouse notes")

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_memory_panel_of_a_sharded_server(browser, tmp_path):
    """Over 2 ranks (--sharding tensor), the panel lists each rank's share of
    the conversation's cache; one process shows no such rows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import save_model_folder

    folder = tmp_path / "model"
    save_model_folder(folder, "llama", dict(num_attention_heads=8, num_key_value_heads=4,
                                            vocab_size=49152))
    server = Assistant(tmp_path / "data", "--model", str(folder), "--kv", "k4v4",
                       "--max-tokens", "8", "--sharding", "tensor", log_file=tmp_path / "log",
                       ranks=2)
    try:
        status, body = server.request("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Tell me about the sea"}],
            "conversation": "sea", "max_tokens": 8})
        assert status == 200, body
        wait = WebDriverWait(browser, 120, poll_frequency=0.05)
        browser.get(server.url)
        # The page opens the newest conversation, then lists them again (marked active).
        wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#conv-list li.active"))
        browser.find_element(By.CSS_SELECTOR, "#conv-list li.active").click()
        ranks = browser.find_element(By.ID, "mem-ranks")
        wait.until(lambda _: ranks.is_displayed() and ranks.text)
        lines = ranks.text.splitlines()
        assert len(lines) == 2, lines
        assert lines[0].startswith("rank 0 (kv heads 0-1 of every layer): ")
        assert lines[1].startswith("rank 1 (kv heads 2-3 of every layer): ")
        assert all("KiB, peak" in x and x.endswith("MiB") for x in lines), lines
    finally:
        server.stop()
