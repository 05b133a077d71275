"""The picture of the live app (docs/app.png): serve a run, type a prompt in headless Chromium, save a screenshot.

    python scripts/app_screenshot.py --model RUN --prompt "a photo of a sneaker" --out docs/app.png
"""

from __future__ import annotations

import argparse

from nitrofusion.app.browser import open_browser, screenshot, type_and_wait
from nitrofusion.app.live import build_app, launch, make_generator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="a photo of a sneaker")
    p.add_argument("--out", default="docs/app.png")
    args = p.parse_args()
    fn, examples = make_generator(args.model)
    demo = build_app(fn, examples)
    launch(demo, block=False)
    driver = open_browser(1100, 640)
    try:
        r = type_and_wait(driver, demo.local_url, args.prompt)
        print(f"{r['latency_text']} (image shown {r['seconds']:.1f} s after the first keystroke)")
        print(f"screenshot: {screenshot(driver, args.out)}")
    finally:
        driver.quit()
        demo.close()


if __name__ == "__main__":
    main()
