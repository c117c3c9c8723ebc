# add, change and delete in the dev tier, with every error path.
C: add alias=j-smith name="smith john" email=john@example.org
S: 200:Ok.
C: add alias=a-smith name="smith alice" email=alice@example.org
S: 200:Ok.
C: add hostname=nas ip=10.0.0.5
S: 200:Ok.
C: add type=machine hostname=web-1 ip=10.0.0.7 ip=10.0.0.8 ip=10.0.0.7
S: 200:Ok.
# add errors
C: add
S: 599:Add command not understood.
C: add alias=x bogus
S: -599:2:argument is not field=value pair.
S: 599:Add command not understood.
C: add alias=x nosuch=1
S: -507:nosuch:unknown field.
S: 599:Add command not understood.
C: add alias=x created=2020-01-01T00:00:00Z
S: -505:created:you may not change this field.
S: 599:Add command not understood.
C: add alias=j-smith name=dup
S: -509:Alias j-smith in use or is too common a name.
S: 599:Add command not understood.
C: add alias=J-SMITH name=dup
S: -509:Alias J-SMITH in use or is too common a name.
S: 599:Add command not understood.
C: add name="no key"
S: -512:a person needs an alias
S: 599:Add command not understood.
C: add alias=x hostname=y
S: -512:these fields do not fit one record type (person or machine)
S: 599:Add command not understood.
C: add type=robot alias=x
S: -512:type must be person or machine, not 'robot'
S: 599:Add command not understood.
C: add hostname=bad_ip ip=10.0.0.300
S: -512:ip '10.0.0.300' is not an IPv4 or IPv6 address
S: 599:Add command not understood.
C: add hostname=bad-mac mac=zz:zz
S: -512:mac 'zz:zz' is not a MAC address like aa:bb:cc:dd:ee:ff
S: 599:Add command not understood.
C: add alias="has space"
S: -512:alias 'has space' must be 1-32 letters, digits, '.', '_' or '-'
S: 599:Add command not understood.
C: add alias=x email=not-an-address
S: -512:email 'not-an-address' is not an address like name@example.org
S: 599:Add command not understood.
C: add alias=x name="two\nlines"
S: -512:name may not contain control characters or line breaks
S: 599:Add command not understood.
C: add hostname=x services=ssh
S: -512:service 'ssh' must look like 22/ssh (port/name)
S: 599:Add command not understood.
C: add alias=x name=a name=b
S: -512:name takes one value
S: 599:Add command not understood.
C: id mdb
S: 200:Thanks.
C: add hostname=from-id
S: 200:Ok.
C: add alias=p-by-field
S: 200:Ok.
C: id ph
S: 200:Thanks.
C: add name=nokey
S: -512:a person needs an alias
S: 599:Add command not understood.
C: query nas return hostname
S: 501:No matches to your query.
C: id somebody
S: 200:Thanks.
# change
C: change alias=j-smith make phone="555 9999" title=Engineer
S: 200:1 entry changed.
C: query alias=j-smith return phone title
S: 102:There was 1 match to your request.
S: -200:1:    phone: 555 9999
S: -200:1:    title: Engineer
S: 200:Ok.
C: change alias=j-smith make title=""
S: 200:1 entry changed.
C: query alias=j-smith return title
S: 102:There was 1 match to your request.
S: -508:1:    title: Not present in entry.
S: 200:Ok.
C: change hostname=web-1 make ip=10.0.0.9 ip=10.0.0.10
S: 200:1 entry changed.
C: query hostname=web-1 return ip
S: 102:There was 1 match to your request.
S: -200:1:       ip: 10.0.0.9
S: -200:1:       ip: 10.0.0.10
S: 200:Ok.
C: change hostname=web-1 force os=Debian
S: 200:1 entry changed.
C: query hostname=web-1 return os
S: 102:There was 1 match to your request.
S: -200:1:       os: Debian
S: 200:Ok.
C: change alias=j-smith make alias=john
S: 200:1 entry changed.
C: query alias=john return alias name
S: 102:There was 1 match to your request.
S: -200:1:    alias: john
S: -200:1:     name: smith john
S: 200:Ok.
C: change alias=john make alias=j-smith
S: 200:1 entry changed.
# change errors
C: change alias=j-smith
S: 599:Did not understand change command.
C: change alias=j-smith make
S: 599:Did not understand change command.
C: change make phone=1
S: -515:no non-null key field in query.
S: 599:Did not understand change command.
C: change alias=nobody make phone=1
S: 501:No matches to specification.
C: change name=smith make phone=1 title=x
S: 200:2 entries changed.
C: change type=person make phone=1
S: 518:Too many entries (3) selected; limit is 2.
C: set limit=3
S: 200:Done.
C: change type=person make phone=1
S: 200:3 entries changed.
C: change alias=j-smith make type=machine
S: -505:type:you may not change this field.
S: 599:Did not understand change command.
C: change alias=j-smith make created=x
S: -505:created:you may not change this field.
S: 599:Did not understand change command.
C: change alias=j-smith make nosuch=1
S: -507:nosuch:unknown field.
S: 599:Did not understand change command.
C: change alias=j-smith make phone
S: -599:Argument 3 (begins phone): must be field=value pair.
S: 599:Did not understand change command.
C: change alias=j-smith make phone=
S: -599:Argument 3 (begins phone=): must be field=value pair.
S: 599:Did not understand change command.
C: change alias=j-smith make alias=a-smith
S: -509:Alias a-smith conflicts with other entries.
S: 500:1 entry found, none changed.
C: change name=smith make alias=same
S: -509:Alias same conflicts with other entries.
S: 500:Only 1 entry changed (2 found).
C: change alias=same make alias=a-smith
S: 200:1 entry changed.
C: change alias=j-smith make alias=""
S: -512:alias may not be removed: it is the record's key
S: 500:1 entry found, none changed.
C: change alias=j-smith make hostname=x
S: -512:hostname is not a field of a person
S: 500:1 entry found, none changed.
C: change name=smith make email=bad
S: -512:email 'bad' is not an address like name@example.org
S: -512:email 'bad' is not an address like name@example.org
S: 500:2 entries found, none changed.
C: change alias=j-smith make phone=555
S: 200:1 entry changed.
C: change alias=a-smith make phone=555
S: 200:1 entry changed.
C: set addonly=on
S: 200:Done.
C: change name=smith make phone=777
S: -521:Field has a value.
S: -521:Field has a value.
S: 500:2 entries found, none changed.
C: change name=smith make mobile=888
S: 200:2 entries changed.
C: set addonly=off limit=2
S: 200:Done.
# delete
C: delete
S: 599:Delete command not understood.
C: delete alias=nobody
S: 501:No entries matched specifications.
C: delete type=person
S: 518:Too many entries (3) selected; limit is 2.
C: delete alias=a-smith return alias
S: 599:Delete command not understood.
C: delete nosuch=1
S: -507:nosuch:unknown field.
S: 599:Delete command not understood.
C: delete alias=a-smith
S: 200:1 entries deleted.
C: query alias=a-smith
S: 501:No matches to your query.
C: delete hostname=nas
S: 200:1 entries deleted.
C: query nas
S: 501:No matches to your query.
