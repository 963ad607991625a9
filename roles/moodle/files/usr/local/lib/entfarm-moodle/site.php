<?php
// entfarm-moodle site.php CONFIG.PHP [--check]
//
// What config.php cannot force, made idempotent for the moodle role (module moodle_cli,
// state=script): the custom profile fields auth_cas fills from the directory (entprofil,
// entuai), and the application cache in the farm's Redis (store entfarm_redis, settings from
// $CFG->entfarm_redis in config.php, so that no password travels on a command line). Prints
// {"changed": bool, "done": [...]}; with --check, only says what it would do.
define('CLI_SCRIPT', true);
$check = in_array('--check', $argv, true);
require($argv[1]);
require_once($CFG->dirroot . '/cache/locallib.php');
require_once($CFG->dirroot . '/user/profile/definelib.php');

$done = [];
$fields = ['entprofil' => 'Profil ENT', 'entuai' => 'Établissement (UAI)'];
foreach ($fields as $shortname => $name) {
    if ($DB->record_exists('user_info_field', ['shortname' => $shortname])) {
        continue;
    }
    $done[] = "profile field $shortname";
    if ($check) {
        continue;
    }
    $category = $DB->get_record('user_info_category', [], '*', IGNORE_MULTIPLE);
    if (!$category) {
        $category = (object) ['name' => 'ENT', 'sortorder' => 1];
        $category->id = $DB->insert_record('user_info_category', $category);
    }
    $field = (object) [
        'shortname' => $shortname, 'name' => $name, 'datatype' => 'text',
        'description' => 'Rempli par le CAS depuis l\'annuaire de l\'ENT.', 'descriptionformat' => FORMAT_HTML,
        'categoryid' => $category->id, 'locked' => 1, 'visible' => PROFILE_VISIBLE_PRIVATE,
        'forceunique' => 0, 'signup' => 0, 'required' => 0, 'param1' => 30, 'param2' => 2048,
    ];
    $field->sortorder = $DB->count_records('user_info_field', ['categoryid' => $category->id]) + 1;
    $DB->insert_record('user_info_field', $field);
}

$store = 'entfarm_redis';
$want = (array) $CFG->entfarm_redis;
$config = cache_config::instance();
$stores = $config->get_all_stores();
if (!isset($stores[$store])) {
    $done[] = "cache store $store";
    if (!$check) {
        cache_config_writer::instance()->add_store_instance($store, 'redis', $want);
    }
} else if ((array) $stores[$store]['configuration'] != $want) {
    $done[] = "cache store $store settings";
    if (!$check) {
        cache_config_writer::instance()->edit_store_instance($store, 'redis', $want);
    }
}
$application = array_values(array_filter($config->get_mode_mappings(),
    function ($m) { return $m['mode'] == cache_store::MODE_APPLICATION; }));
if (!$application || $application[0]['store'] !== $store) {
    $done[] = "application cache mapped to $store";
    if (!$check) {
        cache_config_writer::instance()->set_mode_mappings([
            cache_store::MODE_APPLICATION => [$store, 'default_application'],
            cache_store::MODE_SESSION => ['default_session'],
            cache_store::MODE_REQUEST => ['default_request'],
        ]);
    }
}
echo json_encode(['changed' => count($done) > 0, 'done' => $done]), "\n";
