"""Self-Cascade Studio in the browser: `python app.py` serves the page on the embedded model, offline, on a CPU.

The flags and `main` live in sc_app/studio.py (installed, the same command is `self-cascade-studio`); this file
is the Hugging Face Space's entry (sdk: gradio, app_file: app.py) and keeps `python app.py` working.
"""

from __future__ import annotations

import sys

from sc_app.studio import EXIT_BAD_INPUT, main, parse_args  # noqa: F401  (it imports `spaces` before anything else)

if __name__ == "__main__":
    sys.exit(main())
