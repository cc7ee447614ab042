"""Self-Cascade Studio: higher resolutions from a pre-trained diffusion model (`sc_app.api.generate`)."""

import logging as _logging


class _NoTorchvisionNotice(_logging.Filter):
    """transformers 5 warns, when diffusers imports its image processors, that torchvision is missing and it
    falls back to PIL. Nothing here uses an image processor, so the library's users are spared the notice
    (the command lines and the app set TRANSFORMERS_VERBOSITY instead); other transformers messages pass."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in str(record.msg)


_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
