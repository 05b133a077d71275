"""The live demo: generates from a mini run, serves on 127.0.0.1 by default, never shares publicly."""

import os
import socket
import urllib.request

import pytest

from nitrofusion.cli import main

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls
gradio = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("app") / "run"
    assert main(["distill", "--preset", "tiny", "--out", str(run)]) == 0
    return run


def test_app_generates_deterministically_and_binds_to_localhost(mini_run):
    from nitrofusion.app.live import build_app, launch, make_generator

    fn, examples = make_generator(mini_run)
    a, b, c = fn(examples[0], 1, 3), fn(examples[0], 1, 3), fn(examples[0], 4, 3)
    assert a.size == (256, 256) and a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    demo = build_app(fn, examples)
    launch(demo, block=False)
    try:
        assert demo.server_name == "127.0.0.1" and not demo.share
        with urllib.request.urlopen(demo.local_url, timeout=30) as page:
            assert page.status == 200
        from gradio_client import Client

        client = Client(demo.local_url, verbose=False)
        api = client.view_api(print_info=False, return_format="dict")
        assert list(api["named_endpoints"]) == ["/generate"]
        for args, message in ((("a photo of a bag", 7, 0), "greater than maximum value 4"),
                              (("a photo of a bag", 1, 2**70), "seed must be in"), (("  ", 1, 0), "type a prompt")):
            with pytest.raises(Exception, match=message):  # a message on the page, not a server traceback
                client.predict(*args, api_name="/generate")
    finally:
        demo.close()


def test_app_cli_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    assert main(["app", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_app_cli_refuses_a_taken_port_in_one_line(mini_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["app", "--model", str(mini_run), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot serve on 127.0.0.1:{port}" in err[0] and "--port" in err[0], err


def _serve(mini_run):
    from nitrofusion.app.live import build_app, launch, make_generator

    fn, examples = make_generator(mini_run)
    demo = build_app(fn, examples)
    launch(demo, block=False)
    return demo


@pytest.mark.skipif(__import__("nitrofusion.app.browser", fromlist=["find_browser"]).find_browser() is None,
                    reason="needs chromium and chromium-driver (scripts/install.sh installs them)")
def test_the_app_draws_as_a_visitor_types_in_two_browser_tabs(mini_run, tmp_path):
    """Headless Chromium types key by key, no click and no Enter: the live mode makes the image of the whole
    prompt and shows its latency; two tabs typing at once are both served (one queue, each tab's latest)."""
    import threading

    from nitrofusion.app.browser import open_browser, screenshot, type_and_wait

    demo = _serve(mini_run)
    drivers = []
    try:
        drivers = [open_browser(), open_browser()]
        prompts = ["a photo of a sandal", "a photo of a bag"]
        results: dict[int, dict] = {}

        def visit(i):
            results[i] = type_and_wait(drivers[i], demo.local_url, prompts[i], keystroke_pause=0.02)

        threads = [threading.Thread(target=visit, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert sorted(results) == [0, 1]
        for i, p in enumerate(prompts):
            assert f"“{p}”: 1 step(s), seed 0" in results[i]["latency_text"] and " ms" in results[i]["latency_text"]
        shot = screenshot(drivers[0], tmp_path / "app.png")
        assert shot.stat().st_size > 10_000
    finally:
        for d in drivers:
            d.quit()
        demo.close()
