a:
  cmd.run:
    - name: echo the included a
