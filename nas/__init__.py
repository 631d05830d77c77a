"""nas: block-wise weight-sharing neural architecture search (DNA and BossNAS behind one method interface).

Layout: ``nas.spaces`` (search spaces), ``nas.supernet`` / ``nas.ops`` / ``nas.export`` / ``nas.costs`` /
``nas.recalibration`` (supernets, ops, stand-alone networks, costs, norm statistics), ``nas.search``
(rating tables, constrained search, ranking, ground truth), ``nas.data`` (digits, views), ``nas.methods``
(the method interface and registry, DNA, BossNAS), ``nas.models`` / ``nas.systems`` (the study ResNet, the
classifier system), ``nas.cli`` (``python -m nas.search METHOD``), ``nas/configs/`` (packaged YAML configs).
"""
