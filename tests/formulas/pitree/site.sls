# What top.sls gives every node, as one SLS pimaster applies: `pimaster apply site` (here, or
# `--tree DIR`). Each formula is a directory in the shape community formulas have:
#
#   motd/   init.sls (a relative `.config` include), config.sls (a templated salt:// source list
#           with defaults: and context:, a `- sls: users` requisite), map.jinja (defaults.yaml by
#           import_yaml, grains.filter_by on os_family, pillar.get with merge)
#   users/  a group and its accounts (names: from the pillar, defaults.merge in map.jinja),
#           file.replace, file.append, file.symlink, and a cmd.wait watching the list
#   tz/     timezone.system from the pillar (node03's own pillar differs), an include by SLS name
#           from the root (motd.config) and an `extend:` of a state of that formula
#
# The pillar is in cluster.yaml.
include:
  - motd
  - users
  - tz
