# status, siteinfo, id, set, help and quit: the commands every client sends first.
C: status
S: 200:Database ready.
C: siteinfo
S: -200:1:maildomain:
S: -200:2:mailfield:email
S: -200:3:administrator:root@localhost
S: -200:4:passwords:root@localhost
S: -200:5:mailbox:email
S: -200:6:charset:UTF-8
S: -200:7:server:pharos 0.1.0
S: -200:8:tier:dev
S: -200:9:login:sshsig namespace pharos
S: -200:10:authenticate:1024
S: 200:Ok.
C: id 1000
S: 200:Thanks.
C: id
S: 200:Thanks.
C: set
S: -200:echo:off
S: -200:limit:2
S: -200:verbose:off
S: -200:addonly:off
S: -200:nolog:off
S: -200:charset:utf-8
S: 200:Done.
C: set verbose=off
S: 200:Done.
C: set limit=5 echo=off
S: 200:Done.
C: set language=french
S: -513:language:unknown option
S: 513:No option recognized.
C: set limit=0
S: -512:limit:must be a number from 1 to 1000000
S: 513:No option recognized.
C: set limit=abc echo
S: -512:limit:must be a number from 1 to 1000000
S: 200:Done.
C: set verbose
S: -101: set verbose
S: -100:verbose=on
S: 200:Done.
C: set addonly=on
S: -101: set addonly=on
S: -100:addonly=on
S: 200:Done.
C: set verbose=off
S: -101: set verbose=off
S: 200:Done.
C: set
S: -101: set
S: -200:echo:on
S: -200:limit:5
S: -200:verbose:off
S: -200:addonly:on
S: -200:nolog:off
S: -200:charset:utf-8
S: 200:Done.
C: help
S: -101: help
S: -200:1: The following topics have help (help <topic>):
S: -200:1: add  change  delete  dump  fields  id  keys  login  merge  query  quit  set  siteinfo  status
S: 200:Ok.
C: help query
S: -101: help query
S: -200:1:query: 
S: -200:1: query [field=]value ... [return field ... | return all]
S: -200:1: ph is a synonym. Terms are ANDed; matching ignores case and is word by word;
S: -200:1: a quoted value may hold spaces; wildcards * ? [a-z]. Bare words search
S: -200:1: name and nickname (people) and hostname (machines).
S: -200:1: A search long enough to take turns is refused with 400 (try again later)
S: -200:1: while 8 are under way, or 2 from your network (a /24 or /64).
S: 200:Ok.
C: help native add id
S: -101: help native add id
S: -200:1:add: 
S: -200:1: add field=value ...
S: -200:1: Adds a person (alias=...) or a machine (hostname=...).
S: -200:1: Repeat a multi-valued field (ip, mac, services, tags, ssh_key) for more values.
S: -200:2:id: 
S: -200:2: id <client name>
S: -200:2: Says who the client is; ph and mdb narrow queries to their type.
S: 200:Ok.
C: help native nosuch
S: -101: help native nosuch
S: 500:No help available.
C: help native ../etc/passwd
S: -101: help native ../etc/passwd
S: -524:1:../etc/passwd: Valid help topics don't contain /'s.
S: 500:No help available.
C: set echo
S: -101: set echo
S: 200:Done.
C: status
S: -101: status
S: 200:Database ready.
C: set echo=off
S: -101: set echo=off
S: 200:Done.
C: quit
S: 200:Bye!
CLOSED
