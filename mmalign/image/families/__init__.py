"""Model families beyond SD 1.x/2.x: SDXL, SD3/SD3.5 and FLUX behind one small interface.

- :func:`detect_family` — family of a pipeline folder, hub name, ``model_index.json`` mapping or pipeline object.
- :func:`get_family` — the :class:`~mmalign.image.families.base.Family` object of a name (``sdxl``, ``sd3``,
  ``flux``); ``sd`` stays on the original ``mmalign.image.models`` path.
- :func:`build_family_model` — components + LoRA / frozen copy -> :class:`FamilyPreferenceModel`, from the same
  ``ImageTrainConfig`` vocabulary as SD 1.x (``mmalign.image.families.build``).
"""

from mmalign.image.families.base import Family, FamilyComponents, load_family_components
from mmalign.image.families.detect import FAMILY_NAMES, UnsupportedFamilyError, detect_family, family_from_index

__all__ = ["FAMILY_NAMES", "Family", "FamilyComponents", "UnsupportedFamilyError", "detect_family",
           "family_from_index", "get_family", "load_family_components"]


def get_family(name: str) -> Family:
    """The family object of ``name`` (``sdxl``, ``sd3`` or ``flux``)."""
    from mmalign.image.families.flux import FluxFamily
    from mmalign.image.families.sd3 import SD3Family
    from mmalign.image.families.sdxl import SDXLFamily

    families = {"sdxl": SDXLFamily, "sd3": SD3Family, "flux": FluxFamily}
    if name not in families:
        raise UnsupportedFamilyError(f"family {name!r}: expected one of {', '.join(families)} (sd uses "
                                     "mmalign.image.models)")
    return families[name]()
