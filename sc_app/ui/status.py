"""What a run looks like on the page, as HTML: the status area (a progress bar with the progress line, or what the
run ended with: done, stopped, an error that names its field) and the row of stages or methods (one slot each from
the start, so nothing moves as they finish; the running one shows a live preview).

The status area is `gr.HTML` kept in view (sticky at the top of the results; on a phone it sits right under the
run's buttons). An error's field is marked by a few lines of script that run in the page (`MARK_FIELD`): the field
gets a red outline and the message under it, its accordion opens, and it scrolls into view.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass

import gradio as gr

from .progress import Progress

IDLE = "Ready."

# on the status area's gr.HTML (`js_on_load`): an error names its field's elem_id in data-field; mark that field
MARK_FIELD = """
const mark = () => {
    document.querySelectorAll('.sc-invalid').forEach((old) => {
        old.classList.remove('sc-invalid');
        old.querySelector(':scope > .sc-field-error')?.remove();
    });
    const status = element.querySelector('.sc-error[data-field]');
    const field = status && document.getElementById(status.dataset.field);
    if (!field) return;
    const accordion = field.closest('.sc-accordion');
    const toggle = accordion && accordion.querySelector(':scope > button.label-wrap:not(.open)');
    if (toggle) toggle.click();
    field.classList.add('sc-invalid');
    const note = document.createElement('div');
    note.className = 'sc-field-error';
    note.textContent = status.dataset.message;
    field.appendChild(note);
    setTimeout(() => field.scrollIntoView({block: 'nearest', behavior: 'smooth'}), 50);
    const clear = () => { field.classList.remove('sc-invalid'); note.remove(); };
    field.addEventListener('input', clear, {once: true});
    field.addEventListener('change', clear, {once: true});
};
new MutationObserver(mark).observe(element, {childList: true, subtree: true, characterData: true});
mark();
"""


def status_area(elem_id: str, value: str | None = None) -> gr.HTML:
    """The status area of a tab: idle until a run starts."""
    return gr.HTML(
        value if value is not None else idle(),
        elem_id=elem_id,
        elem_classes=["sc-status-area"],
        js_on_load=MARK_FIELD,
        padding=False,
    )


def _text(text: str) -> str:
    """Plain text for the page, with **bold** as the Markdown the lines used to be."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def idle(text: str = IDLE) -> str:
    return f'<div class="sc-status sc-idle">{_text(text)}</div>'


def running(progress: Progress | None, text: str | None = None, thumbnail: bool = False) -> str:
    """The bar and the progress line; `text` in place of the line (a stage done, waiting for the GPU); with
    `thumbnail`, the stage's latest preview beside them (where the page has no row of slots to show it in)."""
    percent = 0 if progress is None else round(100 * progress.fraction)
    line = text if text is not None else progress.text if progress is not None else "Starting..."
    preview = progress.preview if thumbnail and progress is not None else None
    thumb = "" if preview is None else f'<img class="sc-thumb" src="{data_url(preview)}" alt="preview">'
    return (
        f'<div class="sc-status sc-running" role="status">{thumb}'
        f'<div class="sc-bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="{percent}">'
        f'<span style="width: {percent}%"></span></div><div class="sc-line">{_text(line)}</div></div>'
    )


def done(text: str) -> str:
    return f'<div class="sc-status sc-done" role="status">{_text(text)}</div>'


def stopped(text: str) -> str:
    return f'<div class="sc-status sc-stopped" role="status">{_text(text)}</div>'


def error(message: str, field: str | None = None) -> str:
    """An error, in plain words; `field`: the elem_id of the field it is about, which the page marks."""
    data = f' data-field="{html.escape(field)}" data-message="{html.escape(message)}"' if field else ""
    return f'<div class="sc-status sc-error" role="alert"{data}>{_text(message)}</div>'


# ---- the stage row --------------------------------------------------------------------------------


@dataclass
class Slot:
    """One slot of the row: its name ("pivot", "stage 2 of 3", a method), its size, and either a finished picture
    (`url`, with `detail` such as its seconds), a live preview (a PIL image) or nothing yet."""

    name: str
    width: int
    height: int
    url: str | None = None
    detail: str = ""
    preview: object = None
    alt: str = ""


def data_url(image, quality: int = 80) -> str:
    """A small PIL image as a data: URL (JPEG): a preview, not a result."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def slot_row(slots: list[Slot], running: int | None = None) -> str:
    """The row: one slot per stage (or method), each a frame of the last one's aspect ratio (the target's: every
    frame the same size, whatever each stage's rounding) with a caption of two lines. `running`: the slot now being
    worked on."""
    if not slots:
        return '<div class="sc-slots sc-empty-row"></div>'
    aspect = f"{slots[-1].width} / {slots[-1].height}"
    cells = []
    for n, slot in enumerate(slots):
        size = f"{slot.width} x {slot.height}"
        if slot.url:
            state = "sc-done"
            picture = (
                f'<a href="{html.escape(slot.url)}" target="_blank" rel="noopener">'
                f'<img src="{html.escape(slot.url)}" alt="{html.escape(slot.alt or slot.name + ", " + size)}"></a>'
            )
        elif slot.preview is not None:
            state = "sc-now"
            picture = f'<img src="{data_url(slot.preview)}" alt="preview of {html.escape(slot.name)}">'
        else:
            state = "sc-now" if n == running else "sc-waiting"
            picture = ""
        detail = slot.detail or ("working..." if n == running else "waiting")
        cells.append(
            f'<figure class="sc-slot {state}"><div class="sc-frame" style="aspect-ratio: {aspect}">'
            f"{picture}</div><figcaption><b>{html.escape(slot.name)}</b>"
            f"<span>{html.escape(size)} · {html.escape(detail)}</span></figcaption></figure>"
        )
    return f'<div class="sc-slots" style="--sc-slots: {len(slots)}">{"".join(cells)}</div>'


# ---- the page's styles ----------------------------------------------------------------------------

CSS = """
/* a tab's layout: the prompt and its buttons, then the settings, on the left; the results on the right. On a
   phone: the prompt and buttons, the results (the status area right under the buttons), then the settings. */
.sc-layout { display: grid !important; grid-template-columns: minmax(0, 2fr) minmax(0, 3fr);
    grid-template-areas: "main results" "settings results"; grid-template-rows: auto 1fr;
    align-items: start; gap: var(--layout-gap); }
.sc-layout > .sc-main { grid-area: main; }
.sc-layout > .sc-results { grid-area: results; align-self: stretch; }
.sc-layout > .sc-settings { grid-area: settings; }
.sc-layout > .column { min-width: 0 !important; }
@media (max-width: 800px) {
    .sc-layout { grid-template-columns: minmax(0, 1fr); grid-template-areas: "main" "results" "settings";
        grid-template-rows: auto; }
}
/* the status area stays in view while the results scroll (gradio's container clips without being a scroller) */
.gradio-container { overflow: clip !important; }
.sc-status-area { position: sticky; top: 0; z-index: 1000; background: var(--body-background-fill);
    padding-bottom: 4px; }
.sc-status { padding: 10px 12px; border-radius: var(--radius-lg); border: 1px solid var(--border-color-primary);
    background: var(--background-fill-primary); font-size: var(--text-md); line-height: 1.4; }
.sc-status.sc-running { border-color: var(--color-accent); }
.sc-status.sc-done { border-color: var(--color-green-500, #22c55e); }
.sc-status.sc-error { border-color: var(--error-border-color, #ef4444); color: var(--error-text-color, #b91c1c);
    background: var(--error-background-fill, #fef2f2); }
.sc-bar { height: 8px; border-radius: 4px; background: var(--background-fill-secondary); overflow: hidden;
    margin-bottom: 6px; }
.sc-bar > span { display: block; height: 100%; background: var(--color-accent); transition: width 0.3s; }
.sc-thumb { float: right; height: 48px; margin: 0 0 4px 10px; border-radius: 4px; }
/* a marked field */
.sc-invalid { outline: 2px solid var(--error-border-color, #ef4444); outline-offset: 2px; border-radius: 6px; }
.sc-field-error { color: var(--error-text-color, #b91c1c); font-size: var(--text-sm); padding: 4px 2px 0; }
/* the row of stages (or methods): a slot each from the start, captions of two lines, never cut */
.sc-slots { display: grid; grid-template-columns: repeat(var(--sc-slots), minmax(0, 1fr)); gap: 8px;
    align-items: start; }
.sc-slots.sc-empty-row { min-height: 0; }
.sc-slot { margin: 0; min-width: 0; }
.sc-frame { width: 100%; max-height: 320px; display: flex; align-items: center; justify-content: center;
    border-radius: var(--radius-md); overflow: hidden; background: var(--background-fill-secondary);
    border: 1px solid var(--border-color-primary); }
.sc-slot.sc-waiting .sc-frame { border-style: dashed; }
.sc-slot.sc-now .sc-frame { border-color: var(--color-accent); }
.sc-frame a, .sc-frame img { display: block; width: 100%; height: 100%; }
.sc-frame img { object-fit: contain; image-rendering: auto; }
.sc-slot figcaption { font-size: var(--text-sm); line-height: 1.3; padding-top: 4px; overflow-wrap: anywhere; }
.sc-slot figcaption b { display: block; font-weight: 600; }
.sc-slot figcaption span { color: var(--body-text-color-subdued); }
/* the final image fills the column's width (a small one too), at most most of the screen's height */
#final-image .image-container > button, #final-image .image-frame { width: 100%; }
#final-image .image-frame img { object-fit: contain; width: 100%; height: auto; max-height: 70vh; }
/* the pivot | final slider keeps the images' shape (both letterboxed alike, so the split lines up) */
#final-slider img, #ab-slider img { object-fit: contain !important; }
/* a picture to start from: shown whole, a small one too, in its low box */
.sc-picture img { object-fit: contain; width: 100%; height: 100%; image-rendering: auto; }
/* Stop is grey while nothing runs */
.sc-stop:disabled { opacity: 0.6; }
"""
