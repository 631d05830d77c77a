"""Search methods behind one interface (:mod:`nas.methods.base`): DNA (:mod:`nas.methods.dna`) and BossNAS
(:mod:`nas.methods.bossnas`, its space adapters in :mod:`nas.methods.bossnas_adapters`)."""

from nas.methods.base import SearchMethod, get_method, list_methods, register

__all__ = ["SearchMethod", "get_method", "list_methods", "register"]
