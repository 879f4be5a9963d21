{%- set tz = salt['pillar.get']('tz', default={'name': 'UTC', 'utc': true}, merge=True) %}
include:
  - motd.config                   # its message shows the time zone

system-timezone:
  timezone.system:
    - name: {{ tz.name }}
    - utc: {{ tz.utc }}

# The message names the zone: written once the zone is set.
extend:
  motd-file:
    file.managed:
      - require:
        - timezone: system-timezone
