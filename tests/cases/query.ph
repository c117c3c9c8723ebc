# Query semantics and reply format (DESIGN §6, ph-protocol.md §4.6).
C: add type=person alias=j-smith name="smith john" email=john@example.org office="1 Main St\nSpringfield, IL" phone="555 1234"
S: 200:Ok.
C: add alias=a-smith name="smith alice" nickname=Ally email=alice@example.org
S: 200:Ok.
C: add alias=bob name="Bob O'Brien" title="Chief, Networks" department=IT
S: 200:Ok.
C: add hostname=nas ip=10.0.0.5 ip=fe80::1 mac=AA-BB-CC-DD-EE-FF role=nas services=22/ssh services=445/smb tags=storage owner=j-smith
S: 200:Ok.
C: add hostname=router.lan ip=10.0.0.1 mac=00:11:22:33:44:55 role=router os="OpenWrt 23.05"
S: 200:Ok.
# bare words search name/nickname and hostname; word by word, any order, any case
C: query smith john
S: 102:There was 1 match to your request.
S: -200:1:       type: person
S: -200:1:      alias: j-smith
S: -200:1:       name: smith john
S: -200:1:      email: john@example.org
S: -200:1:      phone: 555 1234
S: 200:Ok.
C: query SMITH
S: 102:There were 2 matches to your request.
S: -200:1:       type: person
S: -200:1:      alias: a-smith
S: -200:1:       name: smith alice
S: -200:1:      email: alice@example.org
S: -200:2:       type: person
S: -200:2:      alias: j-smith
S: -200:2:       name: smith john
S: -200:2:      email: john@example.org
S: -200:2:      phone: 555 1234
S: 200:Ok.
C: query ally
S: 102:There was 1 match to your request.
S: -200:1:       type: person
S: -200:1:      alias: a-smith
S: -200:1:       name: smith alice
S: -200:1:      email: alice@example.org
S: 200:Ok.
C: query nas
S: 102:There was 1 match to your request.
S: -200:1:       type: machine
S: -200:1:   hostname: nas
S: -200:1:         ip: 10.0.0.5
S: -200:1:         ip: fe80::1
S: -200:1:        mac: aa:bb:cc:dd:ee:ff
S: -200:1:       role: nas
S: -200:1:      owner: j-smith
S: -200:1:     status: unknown
S: 200:Ok.
C: query name=smith return alias name email office
S: 102:There were 2 matches to your request.
S: -200:1:    alias: a-smith
S: -200:1:     name: smith alice
S: -200:1:    email: alice@example.org
S: -508:1:   office: Not present in entry.
S: -200:2:    alias: j-smith
S: -200:2:     name: smith john
S: -200:2:    email: john@example.org
S: -200:2:   office: 1 Main St
S: -200:2:   office: Springfield, IL
S: 200:Ok.
C: query name=smith return all
S: 102:There were 2 matches to your request.
S: -200:1:       type: person
S: -200:1:      alias: a-smith
S: -200:1:       name: smith alice
S: -200:1:   nickname: Ally
S: -200:1:      email: alice@example.org
S: -200:1:     source: manual
S~ -200:1:    created: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ
S~ -200:1:   modified: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ
S: -200:2:       type: person
S: -200:2:      alias: j-smith
S: -200:2:       name: smith john
S: -200:2:      email: john@example.org
S: -200:2:      phone: 555 1234
S: -200:2:     office: 1 Main St
S: -200:2:     office: Springfield, IL
S: -200:2:     source: manual
S~ -200:2:    created: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ
S~ -200:2:   modified: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ
S: 200:Ok.
C: query name="smith john" return alias
S: 102:There was 1 match to your request.
S: -200:1:    alias: j-smith
S: 200:Ok.
C: query name="john smith"
S: 501:No matches to your query.
C: query name="smith" return alias
S: 102:There were 2 matches to your request.
S: -200:1:    alias: a-smith
S: -200:2:    alias: j-smith
S: 200:Ok.
C: query name=brien return alias
S: 501:No matches to your query.
C: query name="o'brien" return alias title
S: 102:There was 1 match to your request.
S: -200:1:    alias: bob
S: -200:1:    title: Chief, Networks
S: 200:Ok.
C: query title=chief return alias
S: 102:There was 1 match to your request.
S: -200:1:    alias: bob
S: 200:Ok.
# wildcards
C: query name=smi* return alias
S: 102:There were 2 matches to your request.
S: -200:1:    alias: a-smith
S: -200:2:    alias: j-smith
S: 200:Ok.
C: query name=*ice return alias
S: 102:There was 1 match to your request.
S: -200:1:    alias: a-smith
S: 200:Ok.
C: query name=sm?th return alias
S: 102:There were 2 matches to your request.
S: -200:1:    alias: a-smith
S: -200:2:    alias: j-smith
S: 200:Ok.
C: query name=[ab]ob return alias
S: 102:There was 1 match to your request.
S: -200:1:    alias: bob
S: 200:Ok.
C: query ip=10.0.0.* return hostname ip
S: 102:There were 2 matches to your request.
S: -200:1: hostname: nas
S: -200:1:       ip: 10.0.0.5
S: -200:1:       ip: fe80::1
S: -200:2: hostname: router.lan
S: -200:2:       ip: 10.0.0.1
S: 200:Ok.
C: query hostname=r* return hostname
S: 102:There was 1 match to your request.
S: -200:1: hostname: router.lan
S: 200:Ok.
# whole values with ':' (MAC, IPv6) and case-insensitive MACs
C: query mac=aa:bb:cc:dd:ee:ff return hostname
S: 102:There was 1 match to your request.
S: -200:1: hostname: nas
S: 200:Ok.
C: query mac=AA:BB:CC:DD:EE:FF return hostname mac
S: 102:There was 1 match to your request.
S: -200:1: hostname: nas
S: -200:1:      mac: aa:bb:cc:dd:ee:ff
S: 200:Ok.
C: query ip=fe80::1 return hostname
S: 102:There was 1 match to your request.
S: -200:1: hostname: nas
S: 200:Ok.
C: query ip=fe80 return hostname
S: 102:There was 1 match to your request.
S: -200:1: hostname: nas
S: 200:Ok.
# multi-valued fields repeat the name; return with no fields means the defaults
C: query hostname=nas return
S: 102:There was 1 match to your request.
S: -200:1:       type: machine
S: -200:1:   hostname: nas
S: -200:1:         ip: 10.0.0.5
S: -200:1:         ip: fe80::1
S: -200:1:        mac: aa:bb:cc:dd:ee:ff
S: -200:1:       role: nas
S: -200:1:      owner: j-smith
S: -200:1:     status: unknown
S: 200:Ok.
C: query hostname=nas return all
S: 102:There was 1 match to your request.
S: -200:1:       type: machine
S: -200:1:   hostname: nas
S: -200:1:         ip: 10.0.0.5
S: -200:1:         ip: fe80::1
S: -200:1:        mac: aa:bb:cc:dd:ee:ff
S: -200:1:       role: nas
S: -200:1:      owner: j-smith
S: -200:1:   services: 22/ssh
S: -200:1:   services: 445/smb
S: -200:1:       tags: storage
S: -200:1:     status: unknown
S: -200:1:     source: manual
S~ -200:1:    created: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ
S~ -200:1:   modified: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ
S: 200:Ok.
C: query services=ssh return hostname services
S: 102:There was 1 match to your request.
S: -200:1: hostname: nas
S: -200:1: services: 22/ssh
S: -200:1: services: 445/smb
S: 200:Ok.
C: query owner=j-smith tags=storage return hostname
S: 102:There was 1 match to your request.
S: -200:1: hostname: nas
S: 200:Ok.
# type discrimination: type=, fields one type has, and the client's id
C: query type=machine
S: 102:There were 2 matches to your request.
S: -200:1:       type: machine
S: -200:1:   hostname: nas
S: -200:1:         ip: 10.0.0.5
S: -200:1:         ip: fe80::1
S: -200:1:        mac: aa:bb:cc:dd:ee:ff
S: -200:1:       role: nas
S: -200:1:      owner: j-smith
S: -200:1:     status: unknown
S: -200:2:       type: machine
S: -200:2:   hostname: router.lan
S: -200:2:         ip: 10.0.0.1
S: -200:2:        mac: 00:11:22:33:44:55
S: -200:2:         os: OpenWrt 23.05
S: -200:2:       role: router
S: -200:2:     status: unknown
S: 200:Ok.
C: query type=person return alias
S: 102:There were 3 matches to your request.
S: -200:1:    alias: a-smith
S: -200:2:    alias: bob
S: -200:3:    alias: j-smith
S: 200:Ok.
C: query type=robot
S: 501:No matches to your query.
C: query role=nas alias=j-smith
S: 501:No matches to your query.
C: id mdb
S: 200:Thanks.
C: query smith
S: 501:No matches to your query.
C: query nas return hostname
S: 102:There was 1 match to your request.
S: -200:1: hostname: nas
S: 200:Ok.
C: id ph
S: 200:Thanks.
C: query nas
S: 501:No matches to your query.
C: query smith return alias
S: 102:There were 2 matches to your request.
S: -200:1:    alias: a-smith
S: -200:2:    alias: j-smith
S: 200:Ok.
C: id somebody
S: 200:Thanks.
# errors
C: query
S: -515:no non-null key field in query.
S: -515:Initial metas may be used as qualifiers only.
S: 500:Did not understand query.
C: query return all
S: -515:no non-null key field in query.
S: -515:Initial metas may be used as qualifiers only.
S: 500:Did not understand query.
C: query a
S: -515:no non-null key field in query.
S: -515:Initial metas may be used as qualifiers only.
S: 500:Did not understand query.
C: query *
S: -515:no non-null key field in query.
S: -515:Initial metas may be used as qualifiers only.
S: 500:Did not understand query.
C: query nosuch=x
S: -507:nosuch:unknown field.
S: 500:Did not understand query.
C: query =x
S: -599:=:No field or value specified.
S: 500:Did not understand query.
C: query name=smith return nosuch
S: -507:nosuch:unknown field.
S: 500:Did not understand query.
C: query name=smith return alias=x
S: -599:Argument 1: must be field name.
S: 500:Did not understand query.
C: query zzz
S: 501:No matches to your query.
C: query name=smith return alias name created
S: 102:There were 2 matches to your request.
S: -200:1:    alias: a-smith
S: -200:1:     name: smith alice
S~ -200:1:  created: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ
S: -200:2:    alias: j-smith
S: -200:2:     name: smith john
S~ -200:2:  created: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ
S: 200:Ok.
