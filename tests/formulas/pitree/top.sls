# Salt's top file: which formulas every minion gets. pimaster does not read it (there is no
# highstate); it marks this directory as the root of the state tree, as Salt's file_roots would.
# `site.sls` lists the same formulas as one SLS that pimaster applies:
#
#     pimaster apply site              # from this directory (or: pimaster apply site --tree DIR)
base:
  '*':
    - motd
    - users
    - tz
