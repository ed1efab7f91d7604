"""Unit names as fleet and systemd take them: validation (types, characters, the 255-byte
limit), templates and instances, and fleetctl's argument mangling. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetd.errors import InvalidUnitName
from fleetd.unit.gotext import go_quote, go_quote_rune

#: The longest unit name, in bytes. systemd refuses a name of UNIT_NAME_MAX (256) or more and
#: the unit is a file in the agent's units directory (NAME_MAX 255), so 255. Beyond fleet:
#: its api.unitNameMax let a 256-byte name in, which no machine could then run. The agent's
#: own check (fleetd.systemd.manager) imports this constant.
UNIT_NAME_MAX = 255

#: Types the API accepts (fleet api/units.go validUnitTypes).
VALID_UNIT_TYPES = frozenset(
    {
        "automount",
        "busname",
        "device",
        "mount",
        "path",
        "scope",
        "service",
        "slice",
        "snapshot",
        "socket",
        "swap",
        "target",
        "timer",
    }
)
#: Types allowed for a name containing "@" (templates and instances).
TEMPLATE_UNIT_TYPES = frozenset({"path", "service", "socket", "target", "timer"})
#: fleet's unit.RecognizedUnitType: a subset of the valid types, in fleet's order. fleetctl
#: appends ".service" to anything else (so "foo.target" becomes "foo.target.service").
RECOGNIZED_UNIT_TYPES = ("service", "socket", "timer", "path", "device", "mount", "automount")

_VALID_NAME_CHARS = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" + ":-_.\\@"
)


def validate_name(name: str) -> None:
    """fleet's api.ValidateName, same checks in the same order and the same messages.

    Raises InvalidUnitName describing the first problem. fleet's character check already keeps
    "/", NUL and control characters out. Beyond fleet, names starting with "." (hidden files,
    or nothing before the type) and names containing ".." are refused too, after fleet's checks
    so fleet's messages win where both apply.
    """
    length = len(name.encode("utf-8", "surrogatepass"))  # Go counts bytes
    if length == 0:
        raise InvalidUnitName("unit name cannot be empty")
    if length > UNIT_NAME_MAX:
        raise InvalidUnitName(f"unit name exceeds maximum length ({UNIT_NAME_MAX})")
    dot = name.rfind(".")
    if dot == -1:
        raise InvalidUnitName('unit name must contain "."')
    if dot == len(name) - 1:
        raise InvalidUnitName('unit name cannot end in "."')
    suffix = name[dot + 1 :]
    if suffix not in VALID_UNIT_TYPES:
        raise InvalidUnitName(f"invalid unit type: {go_quote(suffix)}")
    if "@" in name and suffix not in TEMPLATE_UNIT_TYPES:
        raise InvalidUnitName(f"invalid unit type for template: {go_quote(suffix)}")
    for char in name[:dot]:
        if char not in _VALID_NAME_CHARS:
            raise InvalidUnitName(f"invalid character {go_quote_rune(char)} in unit name")
    if name.startswith("@"):
        raise InvalidUnitName('unit name cannot start in "@"')
    if name.startswith("."):
        raise InvalidUnitName('unit name cannot start in "."')
    if ".." in name:
        raise InvalidUnitName('unit name cannot contain ".."')


@dataclass(frozen=True, slots=True)
class UnitNameInfo:
    """The anatomy of a unit name (fleet's unit.UnitNameInfo).

    foo@bar.service: name "foo@bar", prefix "foo", template "foo@.service", instance "bar".
    """

    full_name: str
    name: str  # everything before the last "."
    prefix: str  # everything before the first "@" (the whole name without one)
    template: str = ""  # "<prefix>@.<type>" when the name has an "@"
    instance: str = ""  # between the first "@" and the last "."

    @staticmethod
    def parse(unit_name: str) -> UnitNameInfo | None:
        """fleet's NewUnitNameInfo: None when the name has no "." at all."""
        dot = unit_name.rfind(".")
        if dot == -1:
            return None
        name, suffix = unit_name[:dot], unit_name[dot:]
        at = name.find("@")
        if at == -1:
            return UnitNameInfo(unit_name, name, name)
        prefix = name[:at]
        return UnitNameInfo(unit_name, name, prefix, f"{prefix}@{suffix}", name[at + 1 :])

    @property
    def is_instance(self) -> bool:
        return bool(self.instance)

    @property
    def is_template(self) -> bool:
        return bool(self.template) and not self.is_instance


def make_instance_name(template: str, instance: str) -> str:
    """Name an instance of a template: "foo@.service" + "bar" -> "foo@bar.service"."""
    info = UnitNameInfo.parse(template)
    if info is None or not info.is_template:
        raise InvalidUnitName(f"{go_quote(template)} is not a template unit name")
    return f"{info.name}{instance}{template[len(info.name) :]}"


def is_recognized_type(name: str) -> bool:
    """fleet's unit.RecognizedUnitType: does the name end in a type fleetctl knows?"""
    return any(name.endswith("." + unit_type) for unit_type in RECOGNIZED_UNIT_TYPES)


def maybe_append_default_type(arg: str) -> str:
    """fleetctl's maybeAppendDefaultUnitType: add ".service" unless the type is recognized.

    The path, if any, is kept (this is the name of the local file fleetctl looks for).
    """
    return arg if is_recognized_type(arg) else arg + ".service"


def _go_path_base(path: str) -> str:
    """Go's path.Base."""
    if path == "":
        return "."
    path = path.rstrip("/")
    if path == "":
        return "/"
    return path[path.rfind("/") + 1 :]


def mangle_name(arg: str) -> str:
    """fleetctl's unitNameMangle: the file name of `arg`, with ".service" unless recognized.

    "foo" -> "foo.service", "foo.1" -> "foo.1.service", "foo/bar.socket" -> "bar.socket",
    "foo.target" -> "foo.target.service" (target is valid but not recognized, as in fleet).
    """
    return maybe_append_default_type(_go_path_base(arg))
