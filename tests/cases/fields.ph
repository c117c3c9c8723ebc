# fields: all of them, named ones (any case), and the two error forms.
C: fields 
S: -200:1:type:max 8 Indexed Lookup Public Default
S: -200:1:type:Record type: person or machine. (people and machines)
S: -200:2:alias:max 32 Indexed Lookup Public Default Change
S: -200:2:alias:Unique name of a person. (people)
S: -200:3:name:max 64 Indexed Lookup Public Default Change
S: -200:3:name:Full name. (people)
S: -200:4:nickname:max 32 Indexed Lookup Public Change
S: -200:4:nickname:Other name the person goes by. (people)
S: -200:5:email:max 128 Indexed Lookup Public Default Change
S: -200:5:email:Email address. (people)
S: -200:6:phone:max 32 Indexed Lookup Public Default Change
S: -200:6:phone:Office telephone number. (people)
S: -200:7:mobile:max 32 Indexed Lookup Public Change
S: -200:7:mobile:Mobile telephone number. (people)
S: -200:8:title:max 64 Indexed Lookup Public Default Change
S: -200:8:title:Job title. (people)
S: -200:9:department:max 64 Indexed Lookup Public Default Change
S: -200:9:department:Department or team. (people)
S: -200:10:office:max 128 Indexed Lookup Public Change
S: -200:10:office:Office or postal address. (people)
S: -200:11:url:max 256 Indexed Lookup Public Change
S: -200:11:url:Home page. (people)
S: -200:12:ssh_key:max 900 Indexed Lookup Public Change
S: -200:12:ssh_key:SSH public key (one per line). (people, multi-valued)
S: -200:13:hostname:max 253 Indexed Lookup Public Default Change NoPeople
S: -200:13:hostname:Unique host name of a machine. (machines)
S: -200:14:ip:max 45 Indexed Lookup Public Default Change NoPeople
S: -200:14:ip:IP address (one per line). (machines, multi-valued)
S: -200:15:mac:max 17 Indexed Lookup Public Default Change NoPeople
S: -200:15:mac:MAC address (one per line). (machines, multi-valued)
S: -200:16:os:max 64 Indexed Lookup Public Default Change NoPeople
S: -200:16:os:Operating system. (machines)
S: -200:17:role:max 64 Indexed Lookup Public Default Change NoPeople
S: -200:17:role:What the machine is for (nas, router, ...). (machines)
S: -200:18:owner:max 32 Indexed Lookup Public Default Change NoPeople
S: -200:18:owner:Alias of the person responsible. (machines)
S: -200:19:location:max 128 Indexed Lookup Public Change NoPeople
S: -200:19:location:Where the machine is. (machines)
S: -200:20:vendor:max 64 Indexed Lookup Public Change NoPeople
S: -200:20:vendor:Manufacturer. (machines)
S: -200:21:model:max 64 Indexed Lookup Public Change NoPeople
S: -200:21:model:Model. (machines)
S: -200:22:serial:max 64 Indexed Lookup Public Change NoPeople
S: -200:22:serial:Serial number. (machines)
S: -200:23:services:max 40 Indexed Lookup Public Change NoPeople
S: -200:23:services:Service as port/name, e.g. 22/ssh (one per line). (machines, multi-valued)
S: -200:24:tags:max 32 Indexed Lookup Public Change NoPeople
S: -200:24:tags:Free-form tag (one per line). (machines, multi-valued)
S: -200:25:status:max 8 Indexed Lookup Public Default NoPeople
S: -200:25:status:online, offline or unknown (set by the server). (machines)
S: -200:26:last_seen:max 20 Indexed Lookup Public NoPeople
S: -200:26:last_seen:When the machine was last heard from (set by the server). (machines)
S: -200:27:notes:max 4000 Indexed Lookup Public Change
S: -200:27:notes:Free-form notes. (people and machines)
S: -200:28:source:max 16 Indexed Lookup Public
S: -200:28:source:Who created the record: manual, scan or pulse (set by the server). (people and machines)
S: -200:29:created:max 20 Indexed Lookup Public
S: -200:29:created:When the record was created (set by the server). (people and machines)
S: -200:30:modified:max 20 Indexed Lookup Public
S: -200:30:modified:When the record last changed (set by the server). (people and machines)
S: -200:31:tenant:max 64 Indexed Lookup Public
S: -200:31:tenant:Tenant the record belongs to (enterprise tier; set by the server). (people and machines)
S: -200:32:hostkey:max 96 Indexed Lookup Public Change NoPeople
S: -200:32:hostkey:SSH host key fingerprint, SHA256:... as ssh-keygen -l prints it (one per line). (machines, multi-valued)
S: 200:Ok.
C: fields alias IP
S: -200:2:alias:max 32 Indexed Lookup Public Default Change
S: -200:2:alias:Unique name of a person. (people)
S: -200:14:ip:max 45 Indexed Lookup Public Default Change NoPeople
S: -200:14:ip:IP address (one per line). (machines, multi-valued)
S: 200:Ok.
C: fields alias nosuch
S: -507:nosuch:unknown field.
S: 599:Invalid field request.
C: fields alias=x
S: -599:argument 1:is not a field name.
S: 599:Invalid field request.
