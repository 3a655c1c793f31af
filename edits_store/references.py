"""The one grammar of pack references: ``name`` (the alias ``prod`` if set, else the latest published version),
``name@<32-hex version>``, ``name@<alias>``, ``name@latest``; and what an alias may be called. Syntax only:
whether the pack, version or alias exists is the store's to say."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import AliasError, InvalidReferenceError
from .format import NAME_RE, VERSION_RE

DEFAULT_ALIAS = "prod"
LATEST = "latest"
ALIAS_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9._-]{0,63}\Z")


@dataclass(frozen=True)
class PackReference:
    """A parsed pack reference: ``name``, ``name@<32-hex version>``, ``name@latest`` or ``name@<alias>``.

    The one grammar for references: the store, its CLI and the server's request validation all parse with
    `parse_pack_reference`. Syntax only; whether the pack, version or alias exists is the store's to say.
    """

    name: str
    selector: str | None = None  # None: the "prod" alias if set, else the latest version

    @property
    def is_version(self) -> bool:
        return self.selector is not None and VERSION_RE.match(self.selector) is not None

    @property
    def is_alias(self) -> bool:
        return self.selector is not None and self.selector != LATEST and not self.is_version

    def __str__(self) -> str:
        return self.name if self.selector is None else f"{self.name}@{self.selector}"


def parse_pack_reference(ref: str) -> PackReference:
    """Parse ``ref``; InvalidReferenceError (check ``ref_syntax``) names what is malformed.

    Whole-string matches: ``demo@prod\n`` or `` demo`` are refused, never trimmed.
    """
    if not isinstance(ref, str) or ref.count("@") > 1:
        raise InvalidReferenceError(
            f"malformed pack reference {ref!r}; use name, name@version or name@alias", pack=str(ref), check="ref_syntax"
        )
    name, _, selector = ref.partition("@")
    if not NAME_RE.match(name):
        raise InvalidReferenceError(f"pack name {name!r} must match {NAME_RE.pattern}", pack=ref, check="ref_syntax")
    if _ and not selector:
        raise InvalidReferenceError(f"empty version/alias after '@' in {ref!r}", pack=ref, check="ref_syntax")
    if selector and not (VERSION_RE.match(selector) or selector == LATEST or ALIAS_RE.match(selector)):
        raise InvalidReferenceError(
            f"{selector!r} is neither a version ({VERSION_RE.pattern}), 'latest', nor an alias ({ALIAS_RE.pattern})",
            pack=ref,
            check="ref_syntax",
        )
    return PackReference(name, selector or None)


def check_alias_name(name: str, alias: str) -> None:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias) or alias == LATEST or VERSION_RE.match(alias):
        raise AliasError(
            f"alias {alias!r} must match {ALIAS_RE.pattern} and be neither 'latest' nor version-like",
            pack=name,
            check="alias_name",
        )
