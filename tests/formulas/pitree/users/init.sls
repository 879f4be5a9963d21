{%- from "users/map.jinja" import users with context %}

{{ users.group.name }}:
  group.present:
    - gid: {{ users.group.gid }}

pitree-accounts:
  user.present:
    - names:                      # one user.present per account of the pillar
{%- for name, account in users.accounts | dictsort %}
      - {{ name }}:
        - uid: {{ account.uid }}
        - fullname: {{ account.fullname }}
{%- endfor %}
    - gid: {{ users.group.name }}
    - shell: {{ users.shell }}
    - require:
      - group: {{ users.group.name }}

# Accounts made by hand (useradd) get the cluster's shell too.
useradd-shell:
  file.replace:
    - name: /etc/default/useradd
    - pattern: '^#?\s*SHELL=.*$'
    - repl: SHELL={{ users.shell }}
    - append_if_not_found: true

{{ users.list_file }}:
  file.append:
    - makedirs: true
    - text:
{%- for name in users.accounts | sort %}
      - {{ name }}
{%- endfor %}
    - require:
      - user: pitree-accounts

/usr/local/etc/pitree-accounts:
  file.symlink:
    - target: {{ users.list_file }}
    - makedirs: true

# Rebuilt when the list changes, and only then.
pitree-uids:
  cmd.wait:
    - name: "getent passwd $(cat {{ users.list_file | quote }}) | cut -d: -f1,3 > {{ (users.list_file ~ '.uids') | quote }}"
    - watch:
      - file: {{ users.list_file }}
