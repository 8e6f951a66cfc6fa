"""Templates: which image a sandbox is made from, chosen per create (``{"template": NAME}``).

The operator declares them (``--image`` is the ``default`` template, ``--template NAME=IMAGE``
adds more). A template's resource defaults are labels of its image, written by whoever built
it (``sandbox-image/templates/python/Dockerfile`` sets a bigger home, for packages):

- ``org.twistedgw.home-size``: size of the /home/sandbox tmpfs;
- ``org.twistedgw.tmp-size``: size of each of /tmp and /var/tmp;
- ``org.twistedgw.memory``: the memory limit (tmpfs pages count towards it);
- ``org.twistedgw.exec-tmpfs`` (``true``): files in the home and /tmp may be executed (Docker
  mounts tmpfs ``noexec`` otherwise; a venv's ``bin/pip`` needs it).

Each is applied within the operator's maxima (``--max-disk`` caps both sizes,
``--max-memory`` the memory: the same maxima that bound a creator's ``disk`` and ``memory``,
``lifecycle/resources.py``); without a label the operator's ``--home-size``, ``--tmp-size``
and ``--memory`` apply, as for the default image. A creator's ``cpus``, ``memory`` and
``disk`` go over these defaults.

``TemplateCatalog`` keeps what the engine last said about each template's image (present,
size, build date, labels), refreshed at start-up, by each reconcile and by ``GET /templates``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.logger import Logger

from twistedgw.lifecycle.resources import DEFAULT_MAXIMA, resources_of
from twistedgw.runtime.hardening import ContainerLimits, size_bytes
from twistedgw.runtime.interface import IContainerRuntime, ImageFacts
from twistedgw.sandbox import Resources

#: The template seed creates (and creates without ``template``) get: ``--image``.
DEFAULT_TEMPLATE = "default"
TEMPLATE_NAME_RE = re.compile(r"\A[a-z0-9][a-z0-9_.-]{0,62}\Z")

LABEL_HOME_SIZE = "org.twistedgw.home-size"
LABEL_TMP_SIZE = "org.twistedgw.tmp-size"
LABEL_MEMORY = "org.twistedgw.memory"
LABEL_EXEC_TMPFS = "org.twistedgw.exec-tmpfs"

_SIZE_RE = re.compile(r"\A[1-9][0-9]*[bkmg]?\Z")


def _label_bytes(text: str | None) -> int | None:
    """Bytes of a label's Docker-style size (``512m``, ``2g``); ``None`` if it is not one."""
    if text is None or not _SIZE_RE.match(text.strip().lower()):
        return None
    return size_bytes(text)


def parse_template_option(value: str) -> tuple[str, str]:
    """``NAME=IMAGE`` (``--template``); raises ``ValueError`` saying what is wrong."""
    name, sep, image = value.partition("=")
    name, image = name.strip(), image.strip()
    if not sep or not image:
        raise ValueError(f"--template takes NAME=IMAGE, not {value!r}")
    if not TEMPLATE_NAME_RE.match(name):
        raise ValueError(f"template name {name!r}: use a-z, 0-9, '.', '_' and '-' (at most 63)")
    if name == DEFAULT_TEMPLATE:
        raise ValueError("the default template is --image; give other templates other names")
    return name, image


def parse_pool_option(value: str) -> tuple[str, int]:
    """One ``--pool-size`` value: ``N`` (the default template) or ``NAME=N``."""
    name, sep, count = value.rpartition("=")
    if not sep:
        name = DEFAULT_TEMPLATE
    try:
        number = int(count)
    except ValueError:
        raise ValueError(f"--pool-size takes N or NAME=N, not {value!r}") from None
    if number < 0:
        raise ValueError("--pool-size must be 0 or more")
    return name.strip(), number


def _within(wanted: str | None, default: str, ceiling: int) -> str:
    """``wanted`` (a label) if it is a size no larger than ``ceiling`` bytes; the ceiling if
    it is larger; ``default`` without a (valid) label."""
    wanted_bytes = _label_bytes(wanted)
    if wanted is None or wanted_bytes is None:
        return default
    if wanted_bytes > ceiling:
        return str(ceiling)
    return wanted.strip().lower()


def limits_for_labels(
    base: ContainerLimits, labels: Mapping[str, str], maxima: Resources = DEFAULT_MAXIMA
) -> ContainerLimits:
    """The limits of a template whose image carries ``labels``: the operator's ``base``
    with the labels' resource defaults, each within ``maxima`` (the home and /tmp sizes
    within its ``disk``, the memory within its ``memory``)."""
    return attrs.evolve(
        base,
        home_size=_within(labels.get(LABEL_HOME_SIZE), base.home_size, maxima.disk),
        tmp_size=_within(labels.get(LABEL_TMP_SIZE), base.tmp_size, maxima.disk),
        memory=_within(labels.get(LABEL_MEMORY), base.memory, maxima.memory),
        exec_tmpfs=base.exec_tmpfs or labels.get(LABEL_EXEC_TMPFS, "").lower() == "true",
    )


class TemplateCatalog:
    """The operator's templates, and what the engine last said about their images.

    :param images: template name to image; the ``default`` template's image may be ``None``
        (the runtime's own image, with the runtime's own limits: what fast tests use).
    :param base: the operator's container limits (``None``: leave limits to the runtime).
    """

    _log = Logger()

    def __init__(
        self,
        images: Mapping[str, str | None] | None = None,
        base: ContainerLimits | None = None,
        maxima: Resources = DEFAULT_MAXIMA,
    ) -> None:
        self.images: dict[str, str | None] = {DEFAULT_TEMPLATE: None, **(images or {})}
        self.base = base
        self.maxima = maxima
        #: Template name to what the last inspection found (``None``: image missing).
        self.facts: dict[str, ImageFacts | None] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """Known template names, the default first."""
        return (DEFAULT_TEMPLATE, *sorted(n for n in self.images if n != DEFAULT_TEMPLATE))

    def image_of(self, name: str) -> str | None:
        return self.images[name]

    def limits_of(self, name: str) -> ContainerLimits | None:
        """The limits a ``name`` sandbox gets (``None``: the runtime's own)."""
        facts = self.facts.get(name)
        if self.base is None:
            return None
        if facts is None:
            return self.base
        return limits_for_labels(self.base, facts.labels, self.maxima)

    async def refresh(self, runtime: IContainerRuntime, name: str | None = None) -> None:
        """Inspect the images of every template (or of ``name``); a failed inspection keeps
        what was known."""
        for template in [name] if name is not None else self.names:
            image = self.images[template]
            if image is None:
                continue
            try:
                self.facts[template] = await runtime.inspect_image(image)
            except Exception as e:
                # The engine is down or slow: reconciliation and creates report that already.
                self._log.debug(
                    "could not inspect the image {image} of template {template}: {error}",
                    image=image,
                    template=template,
                    error=str(e),
                )

    async def ensure(self, runtime: IContainerRuntime, name: str) -> None:
        """Inspect ``name``'s image unless it was found before (its labels set its limits)."""
        if self.facts.get(name) is None:
            await self.refresh(runtime, name)

    def describe(self) -> list[dict[str, Any]]:
        """``GET /templates``: each template with its image, size, build date and limits."""
        answer = []
        for name in self.names:
            facts = self.facts.get(name)
            limits = self.limits_of(name)
            entry: dict[str, Any] = {
                "name": name,
                "image": self.images[name],
                "default": name == DEFAULT_TEMPLATE,
                "present": facts is not None,
                "size": facts.size if facts else None,
                "created": facts.created if facts else None,
            }
            if limits is not None:
                # The defaults a create of this template gets, in the shape of a sandbox's
                # ``?details=true`` ``resources`` (and of the create fields that override them).
                entry["resources"] = resources_of(limits).to_json()
                entry["tmp_size"] = size_bytes(limits.tmp_size)
                entry["exec_tmpfs"] = limits.exec_tmpfs
            answer.append(entry)
        return answer
