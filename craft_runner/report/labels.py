"""Table labels of compression configs, tolerant of results from compressors this installation lacks."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def compression_label(c: dict) -> str:
    """The table label of a compress config; a name no compressor is registered under is kept, with a warning."""
    from craft_runner.compress import compression_label as label
    from craft_runner.schema import ConfigError

    try:
        return label(c)
    except ConfigError:
        log.warning("results for an unknown compressor %r: labelled by its name", c.get("name"))
        return str(c.get("name"))
    except (KeyError, TypeError):  # a record of an older schema
        return str(c.get("name"))
