{%- from "motd/map.jinja" import motd with context %}
include:
  - users                         # the message lists the accounts: they exist first (- sls: below)

motd-file:
  file.managed:
    - name: {{ motd.path }}
    - source:                     # the first that exists: a node's own template, else the formula's
      - salt://motd/files/motd-{{ grains.id }}.j2
      - salt://motd/files/motd.j2
    - template: jinja
    - mode: "0644"
    - defaults:
        title: "{{ grains.host }}"
    - context:
        motd: {{ motd | json }}
    - require:
      - sls: users
