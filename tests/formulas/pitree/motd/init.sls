include:
  - .config                       # relative: motd/config.sls
