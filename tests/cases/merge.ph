# merge (extension): discovery writes found by host key, mDNS name, MAC, IP, then hostname;
# provenance.
C: merge source=scan hostname=ip-10-0-0-7 ip=10.0.0.7 mac=00:11:22:33:44:55 services="22/ssh OpenSSH_9.2p1"
S: 200:1 entry added.
C: merge source=scan hostname=ip-10-0-0-7 ip=10.0.0.7 mac=00:11:22:33:44:55 services="22/ssh OpenSSH_9.2p1"
S: 200:No change.
# found by its MAC though the address and name moved (DHCP)
C: merge source=scan hostname=ip-10-0-0-9 ip=10.0.0.9 mac=00-11-22-33-44-55
S: 200:2 fields changed.
# found by its IP when no MAC is given
C: merge source=scan hostname=other ip=10.0.0.9 services=80/http
S: 200:2 fields changed.
# found by its hostname when neither MAC nor IP match
C: merge source=scan hostname=other ip=10.0.0.10
S: 200:1 field changed.
C: query hostname=other return all
S: 102:There was 1 match to your request.
S: -200:1:       type: machine
S: -200:1:   hostname: other
S: -200:1:         ip: 10.0.0.10
S: -200:1:        mac: 00:11:22:33:44:55
S: -200:1:   services: 80/http
S: -200:1:     status: unknown
S: -200:1:     source: scan
S~ -200:1:    created: \S+
S~ -200:1:   modified: \S+
S: 200:Ok.
C: query hostname=other return all sources
S: 102:There was 1 match to your request.
S: -200:1:       type: machine
S: -200:1:   hostname: other
S: -200:1:         ip: 10.0.0.10
S: -200:1:        mac: 00:11:22:33:44:55
S: -200:1:   services: 80/http
S: -200:1:     status: unknown
S: -200:1:     source: scan
S~ -200:1:    created: \S+
S~ -200:1:   modified: \S+
S: -200:1:    sources: hostname=scan ip=scan mac=scan services=scan
S: 200:Ok.
# a person's edit takes the field back; the next scan leaves it alone
C: change hostname=other make hostname=gateway role=router
S: 200:1 entry changed.
C: merge source=scan hostname=other ip=10.0.0.10 role=web services=443/https
S: 200:1 field changed.
C: query hostname=gateway return hostname role services sources
S: 102:There was 1 match to your request.
S: -200:1: hostname: gateway
S: -200:1:     role: router
S: -200:1: services: 443/https
S: -200:1:  sources: ip=scan mac=scan services=scan
S: 200:Ok.
# pulse does not take over what scan owns, but fills what is blank
C: merge source=pulse ip=10.0.0.10 services=22/ssh os=Linux
S: 200:1 field changed.
C: merge source=scan dry_run ip=10.0.0.10 services=22/ssh os=BSD
S: 200:1 field would change: services.
C: query hostname=gateway return os services sources
S: 102:There was 1 match to your request.
S: -200:1:       os: Linux
S: -200:1: services: 443/https
S: -200:1:  sources: ip=scan mac=scan os=pulse services=scan
S: 200:Ok.
# a randomized MAC never finds a machine: a phone gets one record, not one per MAC
C: merge source=scan hostname=phone ip=10.0.0.20 mac=da:a1:19:00:00:01
S: 200:1 entry added.
C: merge source=scan hostname=tablet ip=10.0.0.21 mac=da:a1:19:00:00:01
S: 200:1 entry added.
# a stable locally administered prefix (QEMU/KVM) does
C: merge source=scan hostname=vm-1 ip=10.0.0.30 mac=52:54:00:12:34:56
S: 200:1 entry added.
C: merge source=scan hostname=vm-renamed ip=10.0.0.31 mac=52:54:00:12:34:56
S: 200:2 fields changed.
# an SSH host key outranks everything: the machine keeps its record across addresses, MACs
# and names (the key type before the fingerprint is dropped: one key, one value)
C: merge source=scan hostname=box ip=10.0.0.40 mac=00:16:3e:00:00:01 hostkey="ssh-ed25519 SHA256:LeoukUgI/dn83IUd1HKfsBNMq9xZc5XTGonJvjlY45Y"
S: 200:1 entry added.
C: merge source=scan hostname=nas.local ip=10.0.0.50
S: 200:1 entry added.
C: merge source=scan hostname=nas.local ip=10.0.0.41 mac=00:16:3e:00:00:02 hostkey=SHA256:LeoukUgI/dn83IUd1HKfsBNMq9xZc5XTGonJvjlY45Y
S: 200:2 fields changed.
C: query hostkey=SHA256:LeoukUgI/dn83IUd1HKfsBNMq9xZc5XTGonJvjlY45Y return hostname ip mac hostkey sources
S: 102:There was 1 match to your request.
S: -200:1: hostname: box
S: -200:1:       ip: 10.0.0.41
S: -200:1:      mac: 00:16:3e:00:00:02
S: -200:1:  hostkey: SHA256:LeoukUgI/dn83IUd1HKfsBNMq9xZc5XTGonJvjlY45Y
S: -200:1:  sources: hostkey=scan hostname=scan ip=scan mac=scan
S: 200:Ok.
# an mDNS name (NAME.local) outranks a MAC and an address: a DHCP machine seen on a new one
C: merge source=scan hostname=nas.local ip=10.0.0.41
S: 200:1 field changed.
C: query hostname=nas.local return ip
S: 102:There was 1 match to your request.
S: -200:1:       ip: 10.0.0.41
S: 200:Ok.
# refusals
C: merge hostname=x
S: -599:merge needs source=scan or source=pulse.
S: 599:Merge command not understood.
C: merge source=manual hostname=x
S: -599:merge needs source=scan or source=pulse.
S: 599:Merge command not understood.
C: merge source=scan
S: 599:Merge command not understood.
C: merge source=scan type=person alias=x
S: -512:merge writes machines only (type=machine)
S: 599:Merge command not understood.
C: merge source=scan hostname=x status=online
S: -505:status:you may not change this field.
S: 599:Merge command not understood.
C: merge source=scan hostname=x ip=10.0.0.300
S: -512:ip '10.0.0.300' is not an IPv4 or IPv6 address
S: 599:Merge command not understood.
C: merge source=scan hostname=x hostkey=MD5:16:27:ac:a5:76:28:2d:36:63:1b:56:4d:eb:df:a6:48
S: -512:hostkey 'MD5:16:27:ac:a5:76:28:2d:36:63:1b:56:4d:eb:df:a6:48' must be an SSH fingerprint like SHA256:<43 base64 characters> (ssh-keygen -lf KEY.pub)
S: 599:Merge command not understood.
C: merge source=scan ip=10.0.0.99
S: -512:a machine needs a hostname
S: 599:Merge command not understood.
